"""Packed rows vs padding: a ZO step and an evaluation forward on the embedded SmolLM2-135M and SST-2
(batch 16, shared prompts, 0.1% random mask, float32, 2 threads), as the claims suite runs them.

    python bench/packed_rows.py [--rounds 7] [--json results/bench/packed_rows.json]

The same batches are stepped padded and packed, interleaved round-robin in one process, so machine noise
hits both alike; medians and p10/p90 of the step, the tokens the forward computes (rows x width) beside
the real ones, and the largest difference of the two ways' losses on the same weights (lr 0).
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from benchio import keep


def main() -> None:
    from shared_prompt import sst2_setup  # this folder is on the path of a script run from it

    from zobench.tasks import scoring

    args, model, tok, batches, trainer = sst2_setup(__doc__)
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
        keep(out, args.json)


if __name__ == "__main__":
    main()
