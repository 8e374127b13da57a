"""Benchmark: one perturbation pass of full ZO, old draw against the fused Philox kernel, in GB/s.

On SmolLM2-135M's tensor shapes (134.5M float32 values, random; no model is loaded), 2 CPU threads, every
variant timed once per round, rounds interleaved so that a neighbour's load falls on all of them alike;
medians and the spread (min, max) over rounds. Passes:

    dense     in place, float32: read + write 8 bytes a value
    master    bfloat16 live weights written from a float32 master: read 4 + write 2
    sparse    0.1% of the linear weights through flat int64 indices: read master 4 + index 8, write 2 (bf16)
    fold      restore, weight decay, update and the next +eps perturbation in one pass (in place, float32)

each as ``old`` (directions.draw into a z chunk, then torch ops: the ``generator: torch`` path), ``torch``
(the Philox fallback with torch ops, on a subset of the tensors when it is slow: see "values") and ``c`` (the
C/OpenMP kernel), against a plain float32 ``tensor.copy_`` of the whole set (GB/s counts bytes read +
written). ``fold`` old and ``c-unfolded`` are the two passes (update, then apply) it replaces. Also: the
largest difference between the C kernel's Gaussian z and the fallback's over 10^7 values, and between
either and Box-Muller on torch's own float64 log/cos/sin.

    python bench/zo_kernel.py [--rounds 7] [--threads 2] [--json results/bench/zo_kernel.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from benchio import keep

from zobench.measure.machine import cpu_name
from zobench.zo import fused, philox
from zobench.zo.optim import make_optimizer
from zobench.zo.trainable import DenseTrainable, SparseTrainable

HIDDEN, INTER, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30  # SmolLM2-135M (tied embedding)
FALLBACK_VALUES = {"rademacher": 40_000_000, "gaussian": 2_000_000}  # the fallback's subset


def smollm2_shapes() -> list[tuple[str, tuple[int, ...]]]:
    layer = [("q", (HIDDEN, HIDDEN)), ("k", (KV, HIDDEN)), ("v", (KV, HIDDEN)), ("o", (HIDDEN, HIDDEN)),
             ("gate", (INTER, HIDDEN)), ("up", (INTER, HIDDEN)), ("down", (HIDDEN, INTER)),
             ("norm1", (HIDDEN,)), ("norm2", (HIDDEN,))]
    return [("embed", (VOCAB, HIDDEN))] + [(f"l{i}.{n}", s) for i in range(LAYERS) for n, s in layer] + \
        [("norm", (HIDDEN,))]


def tensors(shapes, dtype) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(n, torch.randn(s, generator=gen).to(dtype)) for n, s in shapes]


def prefix(params, values: int):
    """The first tensors of ``params`` holding at least ``values`` values."""
    out, n = [], 0
    for name, p in params:
        if n >= values:
            break
        out.append((name, p))
        n += p.numel()
    return out


class Pass:
    """One timed pass: ``run`` after an untimed ``setup``, over ``values`` values moving ``per_value`` bytes
    each (read + written), under the torch fallback when ``fallback``."""

    def __init__(self, run, values: int, per_value: int, setup=None, fallback: bool = False):
        self.run, self.values, self.per_value, self.setup, self.fallback = run, values, per_value, setup, fallback


def toggle(t, per_value: int, fallback: bool = False) -> Pass:
    """``apply`` with one seed and alternating sign: exactly one pass each (+eps, then -2 eps, ...)."""
    return Pass(lambda: t.apply(7, -t._scale if t._scale else 1e-3), t.numel, per_value, fallback=fallback)


def step(t, fold: bool) -> Pass:
    """From a pending -eps perturbation (the untimed set-up), the step's update and the next step's +eps:
    ``fold_step`` (one pass) or ``update`` then ``apply`` (two)."""
    sgd, seeds = make_optimizer("sgd", 1e-6, weight_decay=1e-2), iter(range(10, 10**9))

    def setup():
        t.apply(t._seed if t._seed is not None else 1, -1e-3)

    def run():
        grads, nxt = [(t._seed, 0.5)], next(seeds)
        if fold:
            t.fold_step(grads, sgd, 0, nxt, 1e-3)
        else:
            t.update(grads, sgd, 0)
            t.apply(nxt, 1e-3)
    return Pass(run, t.numel, 8 if fold else 16, setup)


def passes(direction: str, f32, bf16) -> dict[str, Pass]:
    linear = [(n, p) for n, p in bf16 if p.dim() == 2 and n != "embed"]
    gen = torch.Generator().manual_seed(1)
    mask = {n: torch.randperm(p.numel(), generator=gen)[:p.numel() // 1000] for n, p in linear}
    out = {}
    for generator, tag in (("torch", "old"), ("philox", "c")):
        for name, t, per_value in (("dense", DenseTrainable(f32, direction, generator=generator), 8),
                                   ("master", DenseTrainable(bf16, direction, True, generator=generator), 6),
                                   ("sparse", SparseTrainable(linear, mask, direction, generator), 14)):
            out[f"{name}/{tag}"] = toggle(t, per_value)
        out["fold/old" if tag == "old" else "fold/c-unfolded"] = step(DenseTrainable(f32, direction,
                                                                                     generator=generator), False)
    out["fold/c"] = step(DenseTrainable(f32, direction), True)
    few = FALLBACK_VALUES[direction]
    for name, t, per_value in (("dense", DenseTrainable(prefix(f32, few), direction), 8),
                               ("master", DenseTrainable(prefix(bf16, few), direction, True), 6),
                               ("sparse", SparseTrainable(linear, mask, direction), 14)):
        out[f"{name}/torch"] = toggle(t, per_value, fallback=True)
    return out


def copy_pass(f32) -> Pass:
    dst = [torch.empty_like(p) for _, p in f32]

    def run():
        for d, (_, p) in zip(dst, f32):
            d.copy_(p)
    return Pass(run, sum(p.numel() for _, p in f32), 8)


def measure(fns: dict[str, Pass], rounds: int) -> dict[str, list[float]]:
    times = {name: [] for name in fns}
    for r in range(rounds + 1):  # round 0 warms up: kernel load, first-touch pages, the allocator
        for name, p in fns.items():
            with fused.torch_fallback() if p.fallback else contextlib.nullcontext():
                if p.setup is not None:
                    p.setup()
                t = time.perf_counter()
                p.run()
                if r:
                    times[name].append(time.perf_counter() - t)
    return times


def gaussian_agreement(n: int = 10_000_000, seed: int = 12345) -> dict:
    """C against fallback, and both against Box-Muller on torch's float64 log/cos/sin, over ``n`` values."""
    c = fused.fill_z(torch.empty(n), 0, "gaussian", seed)
    with fused.torch_fallback():
        t = fused.fill_z(torch.empty(n), 0, "gaussian", seed)
    w = philox.blocks(seed, 0, n // 4, "cpu")
    ref = []
    for p in (0, 1):
        rad = torch.sqrt(-2 * torch.log((w[2 * p].double() + 0.5) * 2.0**-32))
        theta = (w[2 * p + 1].double() + 0.5) * philox.TWO_PI_2M32
        ref += [(rad * torch.cos(theta)).float(), (rad * torch.sin(theta)).float()]
    ref = torch.stack(ref, 1).view(-1)

    def diff(a, b):
        d = (a - b).abs()
        return {"max_abs": float(d.max()), "max_rel": float((d / b.abs().clamp(min=1e-30)).max()),
                "differing": int((d > 0).sum())}
    return {"values": n, "c_vs_torch_fallback": diff(c, t), "c_vs_libm_box_muller": diff(c[:ref.numel()], ref)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = smollm2_shapes()
    f32, bf16 = tensors(shapes, torch.float32), tensors(shapes, torch.bfloat16)
    out = {"cpu": cpu_name(), "threads": args.threads, "rounds": args.rounds, "path": fused.path(),
           "fallback_reason": fused.fallback_reason(), "values": sum(p.numel() for _, p in f32),
           "note": "preliminary: 2 shared cores, another process may have been running", "passes": {}}
    for direction in ("rademacher", "gaussian"):
        fns = {"copy": copy_pass(f32), **passes(direction, f32, bf16)}
        times = measure(fns, args.rounds)
        # Against the copy's median and, less exposed to a neighbour's bursts, its best round.
        copy_gbs = fns["copy"].values * 8 / statistics.median(times["copy"]) / 1e9
        copy_best = fns["copy"].values * 8 / min(times["copy"]) / 1e9
        for name, ts in times.items():
            p, med = fns[name], statistics.median(ts)
            gbs, best = p.values * p.per_value / med / 1e9, p.values * p.per_value / min(ts) / 1e9
            out["passes"][f"{direction}/{name}"] = {
                "values": p.values, "bytes_per_value": p.per_value, "median_s": med, "min_s": min(ts),
                "max_s": max(ts), "ns_per_value": med / p.values * 1e9, "gb_s": gbs, "of_copy": gbs / copy_gbs,
                "gb_s_best": best, "of_copy_best": best / copy_best}
            print(f"{direction:10s} {name:16s} {med * 1e3:9.1f} ms  [{min(ts) * 1e3:.1f}, {max(ts) * 1e3:.1f}]"
                  f"  {gbs:6.2f} GB/s  {gbs / copy_gbs:5.2f} of copy  (best rounds: {best:6.2f} GB/s, "
                  f"{best / copy_best:5.2f})")
        del fns, times  # the next direction's masters take their place, not their side
    out["gaussian_agreement"] = gaussian_agreement()
    print(json.dumps(out["gaussian_agreement"]))
    if args.json:
        keep(out, args.json)


if __name__ == "__main__":
    main()
