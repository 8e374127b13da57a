"""QuZO's code passes per step, C library against the torch path, side by side, beside a forward of the batch.

    python bench/quzo_passes.py [--rounds 3] [--json results/bench/quzo_passes.json]
    python bench/quzo_passes.py --lib before.so --lib after.so [--rounds 8]

SmolLM2-135M quantized as the quantized-zo suite quantizes it (``nf4-plain``, ``int8``), QuZO's trainable
(every code of the block linears, stochastic rounding, Rademacher z), and the claims batch (16 packed SST-2
rows). One round times, in this process: a step's passes over the codes as the trainer makes them (the
previous step's update folded into this step's +eps perturbation, ``fold_step``, then the -eps perturbation
with its restore) on the C library (``zo_grid4`` / ``zo_int8``), the same on the torch path
(``fused.torch_fallback``), and an eval forward of the batch; the rounds interleave them, so load on the
machine falls on both alike. Reported per quant: median seconds of each, the C speed-up, and 1 + passes /
(2 forwards): what the passes add to a step over its two forwards. Run it on an otherwise idle machine.

With ``--lib`` (twice or more: builds of zo_pass.c with the same interface, e.g. the library of the tree
before a change, from ``zobench.zo.kernels.build.library_path()``), the rounds alternate those libraries in
one process instead of C against torch: a kernel change timed side by side, the same codes and process,
in an order reversed every other round (the second of two identical libraries ran ~5% slower on nf4-plain).
Processes differ by ~10% from run to run on this machine (the same code's passes: 0.18-0.27 s), more than
most single changes, so compare libraries in one process where the interface allows.
"""

from __future__ import annotations

import argparse
import ctypes
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

EPS, OPT = 1e-3, ZOSGD(1e-5)


def passes(trainable: CodeTrainable, seed: int) -> float:
    """A step's passes: the pending update (of the step before, seed - 1) folded into +eps, then -eps."""
    t = time.perf_counter()
    trainable.fold_step([(seed - 1, 0.5)], OPT, 0, seed, EPS)
    trainable.apply(seed, -EPS)
    return time.perf_counter() - t


def run(quant: str, rounds: int, libs: list[str] | None = None) -> dict:
    loaded = load_model("smollm2")
    model = loaded.model.eval()
    quantize_model(model, get_backend(quant), QuantContext(tokenizer=loaded.tokenizer), linear_layers(model))
    split = get_task("sst2").sample(None, n_train=16, n_dev=0, n_test=0, seed=0)
    batch = scoring.encode(split.train, loaded.tokenizer, "classification", max_length=128, train=True,
                           shared=True, pack=True)
    trainable = CodeTrainable(code_layers(model))
    trainable.apply(0, EPS)
    trainable.apply(0, -EPS)  # a step's state after its forwards: -eps pending, its update to come
    bound = {path: fused.bind(ctypes.CDLL(path)) for path in libs or ()}
    fused._library()
    default = fused._state["lib"]
    times: dict[str, list] = {k: [] for k in [*bound, "forward"]} if bound else {"c": [], "torch": [], "forward": []}
    seed = 1
    for r in range(rounds + 1):  # round 0 warms up
        got = {}
        if bound:  # the order reversed every other round: a library's place in a round showed (~5%)
            for path, lib in (list(bound.items()) if r % 2 else list(bound.items())[::-1]):
                fused._state["lib"] = lib
                got[path] = passes(trainable, seed)
                seed += 1
            fused._state["lib"] = default
        else:
            got["c"] = passes(trainable, seed)
            with fused.torch_fallback():
                got["torch"] = passes(trainable, seed + 1)
            seed += 2
        with torch.no_grad():
            t = time.perf_counter()
            scoring.loss(model, batch)  # the forward a ZO step runs twice
            got["forward"] = time.perf_counter() - t
        if r:
            for k, v in got.items():
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    if bound:
        return {"values": trainable.numel, "rounds": rounds, "seconds": times, "median_s": med,
                "step_over_2fwd": {k: 1 + med[k] / (2 * med["forward"]) for k in bound}}
    return {"values": trainable.numel, "rounds": rounds, "seconds": times, "median_s": med,
            "c_speedup": med["torch"] / med["c"],
            "step_over_2fwd_c": 1 + med["c"] / (2 * med["forward"]),
            "step_over_2fwd_torch": 1 + med["torch"] / (2 * med["forward"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--lib", action="append", help="a build of zo_pass.c to alternate with the others given")
    args = ap.parse_args()
    if args.lib and len(args.lib) < 2:
        ap.error("--lib: give two or more libraries to alternate")
    out = {"threads": torch.get_num_threads(), "path": fused.path(), "quants": {}}
    for quant in ("nf4-plain", "int8"):
        res = out["quants"][quant] = run(quant, args.rounds, args.lib)
        m = res["median_s"]
        if args.lib:
            print(f"{quant}: forward {m['forward']:.3f} s; passes per step " + ", ".join(
                f"{path} {m[path]:.3f} s (1 + passes / 2 fwd {res['step_over_2fwd'][path]:.2f})" for path in args.lib))
            continue
        print(f"{quant}: {res['values']:,} codes; passes per step C {m['c']:.2f} s, torch {m['torch']:.2f} s "
              f"({res['c_speedup']:.1f}x); forward {m['forward']:.2f} s; 1 + passes / 2 fwd: C "
              f"{res['step_over_2fwd_c']:.2f}, torch {res['step_over_2fwd_torch']:.2f}")
    if args.json:
        keep(out, args.json)


if __name__ == "__main__":
    main()
