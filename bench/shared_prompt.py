"""One forward per prompt for single-token options vs MeZO's one sequence per option: a ZO step on the
embedded SmolLM2-135M and SST-2 (batch 16, 0.1% random mask, float32, 2 threads).

    python bench/shared_prompt.py [--rounds 7] [--json results/bench/shared_prompt.json]

The two encodings of the same batches are stepped interleaved, round-robin, in one process, so machine
noise hits both alike; medians and p10/p90 of the step, the loss of both ways on the same weights (they
must agree), and the input tokens per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from benchio import keep


def sst2_setup(doc: str):
    """The arguments (--rounds, --json), SmolLM2 and its tokenizer, SST-2 batches of 16 (one per round and a
    warm-up), and a ZO trainer on a 0.1% random mask at lr 0 (every round sees the same weights)."""
    from zobench.models import load_model
    from zobench.tasks import get_task, scoring
    from zobench.zo import masks as M
    from zobench.zo.optim import make_optimizer
    from zobench.zo.trainable import SparseTrainable
    from zobench.zo.trainer import ZOTrainer

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    examples = get_task("sst2").sample(None, n_train=16 * (args.rounds + 1), n_dev=0, n_test=0, seed=0).train
    batches = [examples[i:i + 16] for i in range(0, len(examples), 16)]
    linear = M.scoped_params(model, "linear")
    trainable = SparseTrainable(linear, M.random_mask(linear, 1e-3, seed=0))
    trainer = ZOTrainer(model, trainable, make_optimizer("sgd", 0.0), scoring.loss, eps=1e-3)
    return args, model, tok, batches, trainer


def main() -> None:
    from zobench.tasks import scoring

    args, model, tok, batches, trainer = sst2_setup(__doc__)
    ways = {"per option (MeZO)": False, "shared prompt": True}
    times = {k: [] for k in ways}
    tokens = {k: [] for k in ways}
    gaps = []
    for r, exs in enumerate(batches):
        losses = {}
        for name, shared in ways.items():
            batch = scoring.encode(exs, tok, "classification", 128, shared=shared)
            res = trainer.step(batch, r)
            with torch.inference_mode():
                losses[name] = float(scoring.loss(model, batch))
            if r:  # the first round warms up
                times[name].append(res.total_s)
                tokens[name].append(int(batch["attention_mask"].sum()))
        gaps.append(abs(losses["shared prompt"] - losses["per option (MeZO)"]))
        print(f"  round {r}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in times.items() if v),
              file=sys.stderr, flush=True)
    out = {}
    for name in ways:
        q = statistics.quantiles(times[name], n=10)
        out[name] = {"step_ms_median": 1000 * statistics.median(times[name]), "p10_ms": 1000 * q[0],
                     "p90_ms": 1000 * q[-1], "tokens_per_step": statistics.mean(tokens[name])}
    base, new = out["per option (MeZO)"], out["shared prompt"]
    out["step_ratio_shared_over_per_option"] = new["step_ms_median"] / base["step_ms_median"]
    out["max_loss_difference"] = max(gaps)
    print(json.dumps(out, indent=1))
    if args.json:
        keep(out, args.json)


if __name__ == "__main__":
    main()
