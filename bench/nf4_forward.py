"""Benchmark: an NF4 forward against the float forward on this CPU, each NF4 way side by side.

    python bench/nf4_forward.py [--rounds 15] [--json results/bench/nf4_forward.json]

SmolLM2-135M, the claims suite's batch (16 packed SST-2 rows), 2 threads, interleaved rounds (medians and
p10-p90 of per-round ratios to the float forward, as bench/zo_step.py does). Ways:
  float32       the unquantized model
  nf4-bnb       bitsandbytes' own Linear4bit forward as zobench builds it (quant/bnb.py switches off its AVX512-BF16
                repack, which rounds activations to bfloat16: bench/nf4_direction.py)
  nf4-dequant   every 4-bit layer dequantized to float32 and multiplied in one matmul, per layer per forward
                (the dense-and-sparse layer's merged way, without sparse values)
The CPU's instruction-set flags are in the output: which path bitsandbytes takes depends on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import bitsandbytes.functional as bf
import torch
from benchio import keep

from zobench.measure.env import cpu_flags, cpu_name
from zobench.models import load_model
from zobench.quant import QuantContext, get_backend, quantize_model
from zobench.tasks import get_task, scoring
from zobench.zo.masks import linear_layers


class Dequantized(torch.nn.Module):
    """A Linear4bit's forward as dequantize-to-float32-then-matmul."""

    def __init__(self, q):
        super().__init__()
        self.q = q

    def forward(self, x):
        w = bf.dequantize_4bit(self.q.weight.data, self.q.weight.quant_state).to(x.dtype)
        return torch.nn.functional.linear(x, w, self.q.bias)


def nf4_model(dequant: bool):
    loaded = load_model("smollm2")
    backend = get_backend("nf4")
    ctx = QuantContext(device="cpu", dtype=torch.float32, tokenizer=loaded.tokenizer, seed=0)
    quantize_model(loaded.model, backend, ctx, linear_layers(loaded.model))
    if dequant:
        for name, module in list(loaded.model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child).__name__ == "Linear4bit":
                    setattr(module, child_name, Dequantized(child))
    return loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = load_model("smollm2")
    split = get_task("sst2").sample(None, n_train=16, n_dev=0, n_test=0, seed=0)
    batch = scoring.encode(split.train, base.tokenizer, "classification", max_length=128, train=True,
                           shared=True, pack=True)
    models = {"float32": base.model, "nf4-bnb": nf4_model(False).model, "nf4-dequant": nf4_model(True).model}
    losses, times = {}, {k: [] for k in models}
    with torch.inference_mode():
        for k, m in models.items():
            losses[k] = float(scoring.loss(m, batch))  # warm-up, and what each way computes
        for r in range(args.rounds):
            for k, m in models.items():
                t = time.perf_counter()
                scoring.loss(m, batch)
                times[k].append(time.perf_counter() - t)
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms"
                                                              for k, v in times.items()), file=sys.stderr)
    rows = []
    for k in models:
        ratios = sorted(a / b for a, b in zip(times[k], times["float32"]))
        rows.append({"way": k, "median_ms": statistics.median(times[k]) * 1000,
                     "x_float": statistics.median(ratios), "x_p10": ratios[len(ratios) // 10],
                     "x_p90": ratios[-1 - len(ratios) // 10], "loss": losses[k]})
    print(f"\nNF4 forward vs float32, SmolLM2-135M, claims batch, 2 threads, {args.rounds} interleaved rounds; "
          f"CPU {cpu_name()} ({', '.join(cpu_flags())})")
    for row in rows:
        print(f"{row['way']:12s} {row['median_ms']:7.0f} ms  x float {row['x_float']:.2f} [{row['x_p10']:.2f}-"
              f"{row['x_p90']:.2f}]  loss {row['loss']:.6f}")
    if args.json:
        keep({"rounds": args.rounds, "cpu": cpu_name(), "cpu_flags": cpu_flags(),
              "when": time.strftime("%Y-%m-%d"), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
