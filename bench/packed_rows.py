"""Packed rows vs padding: a ZO step and an evaluation forward on the embedded SmolLM2-135M and SST-2
(batch 16, shared prompts, 0.1% random mask, float32, 2 threads), as the claims suite runs them.

    python bench/packed_rows.py [--rounds 7] [--json results/bench/packed_rows.json]

The same batches are stepped padded and packed, interleaved round-robin in one process, so machine noise
hits both alike; medians and p10/p90 of the step, the tokens the forward computes (rows x width) beside
the real ones, and the largest difference of the two ways' losses on the same weights (lr 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def main() -> None:
    from zobench.models import load_model
    from zobench.tasks import get_task, scoring
    from zobench.zo import masks as M
    from zobench.zo.optim import make_optimizer
    from zobench.zo.trainable import SparseTrainable
    from zobench.zo.trainer import ZOTrainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    trainer = ZOTrainer(model, trainable, make_optimizer("sgd", 0.0), scoring.loss, eps=1e-3)  # lr 0: same w
    shapes: list[tuple] = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    ways = {"padded": False, "packed": True}
    times = {k: [] for k in ways}
    slots = {k: [] for k in ways}
    real, gaps = [], []
    for r, exs in enumerate(batches):
        losses = {}
        for name, pack in ways.items():
            batch = scoring.encode(exs, tok, "classification", 128, shared=True, pack=pack)
            shapes.clear()
            res = trainer.step(batch, r)
            rows, width = shapes[0]
            with torch.inference_mode():
                losses[name] = float(scoring.loss(model, batch))
            if r:  # the first round warms up
                times[name].append(res.total_s)
                slots[name].append(rows * width)
        if r:
            real.append(int(batch["attention_mask"].sum()))
        gaps.append(abs(losses["packed"] - losses["padded"]))
        print(f"  round {r}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in times.items() if v),
              file=sys.stderr, flush=True)
    out = {"batch": 16, "task": "sst2", "model": "smollm2", "real_tokens_per_forward": statistics.mean(real)}
    for name in ways:
        q = statistics.quantiles(times[name], n=10)
        out[name] = {"step_ms_median": 1000 * statistics.median(times[name]), "p10_ms": 1000 * q[0],
                     "p90_ms": 1000 * q[-1], "computed_tokens_per_forward": statistics.mean(slots[name])}
    out["step_ratio_packed_over_padded"] = out["packed"]["step_ms_median"] / out["padded"]["step_ms_median"]
    out["max_loss_difference"] = max(gaps)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
