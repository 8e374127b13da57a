"""QuZO's code passes per step, C library against the torch path, side by side, beside a forward of the batch.

    python bench/quzo_passes.py [--rounds 3] [--json results/bench/quzo_passes.json]

SmolLM2-135M quantized as the quantized-zo suite quantizes it (``nf4-plain``, ``int8``), QuZO's trainable
(every code of the block linears, stochastic rounding, Rademacher z), and the claims batch (16 packed SST-2
rows). One round times, in this process: a step's three passes over the codes (+eps perturbation, -eps
perturbation with the restore, the update with its restore) on the C library (``zo_grid4`` / ``zo_int8``),
the same on the torch path (``fused.torch_fallback``), and an eval forward of the batch; the rounds
interleave them, so load on the machine falls on both alike. Reported per quant: median seconds of each, the
C speed-up, and 1 + passes / (2 forwards): what the passes add to a step over its two forwards. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from benchio import keep

from zobench.methods.quzo import CodeTrainable
from zobench.models import load_model
from zobench.quant import QuantContext, get_backend, quantize_model
from zobench.quant.codes import code_layers
from zobench.tasks import get_task, scoring
from zobench.zo import fused
from zobench.zo.masks import linear_layers
from zobench.zo.optim import ZOSGD


def passes(trainable: CodeTrainable, seed: int) -> float:
    t = time.perf_counter()
    trainable.apply(seed, 1e-3)
    trainable.apply(seed, -1e-3)
    trainable.update([(seed, 0.5)], ZOSGD(1e-5), 0)
    return time.perf_counter() - t


def run(quant: str, rounds: int) -> dict:
    loaded = load_model("smollm2")
    model = loaded.model.eval()
    quantize_model(model, get_backend(quant), QuantContext(tokenizer=loaded.tokenizer), linear_layers(model))
    split = get_task("sst2").sample(None, n_train=16, n_dev=0, n_test=0, seed=0)
    batch = scoring.encode(split.train, loaded.tokenizer, "classification", max_length=128, train=True,
                           shared=True, pack=True)
    trainable = CodeTrainable(code_layers(model))
    times = {"c": [], "torch": [], "forward": []}
    for r in range(rounds + 1):  # round 0 warms up
        got = {"c": passes(trainable, 2 * r + 1)}
        with fused.torch_fallback():
            got["torch"] = passes(trainable, 2 * r + 2)
        with torch.no_grad():
            t = time.perf_counter()
            scoring.loss(model, batch)  # the forward a ZO step runs twice
            got["forward"] = time.perf_counter() - t
        if r:
            for k, v in got.items():
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"values": trainable.numel, "rounds": rounds, "seconds": times, "median_s": med,
            "c_speedup": med["torch"] / med["c"],
            "step_over_2fwd_c": 1 + med["c"] / (2 * med["forward"]),
            "step_over_2fwd_torch": 1 + med["torch"] / (2 * med["forward"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {"threads": torch.get_num_threads(), "path": fused.path(), "quants": {}}
    for quant in ("nf4-plain", "int8"):
        res = out["quants"][quant] = run(quant, args.rounds)
        m = res["median_s"]
        print(f"{quant}: {res['values']:,} codes; passes per step C {m['c']:.2f} s, torch {m['torch']:.2f} s "
              f"({res['c_speedup']:.1f}x); forward {m['forward']:.2f} s; 1 + passes / 2 fwd: C "
              f"{res['step_over_2fwd_c']:.2f}, torch {res['step_over_2fwd_torch']:.2f}")
    if args.json:
        keep(out, args.json)


if __name__ == "__main__":
    main()
