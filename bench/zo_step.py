"""Benchmark: one ZO step against two forward passes, and its peak memory against inference.

Set-up of the issue's targets: SmolLM2-135M (the embedded default), float32, a batch of 16 x 32 tokens,
2 CPU threads. Variants are timed interleaved, round-robin, in one process, so machine noise hits all
of them alike; medians and p10/p90 are reported. Peak RSS is measured per variant in a fresh child
process (with MALLOC_MMAP_THRESHOLD_ so freed blocks leave the heap), after a warm-up step.

    python bench/zo_step.py [--rounds 5] [--model smollm2] [--json results/bench_zo_step.json]

Variants:
  forward          one inference forward (the unit: a ZO step needs two)
  full-rademacher  full ZO (every weight), zobench's default direction, restore folded into update
  full-gaussian    full ZO with MeZO's Gaussian z
  lezo-0.25        LeZO: a quarter of the blocks (and the rest of the model as one more unit) per step
  sparse           0.1% random mask, z of length nnz (zobench's sparse path)
  sparse-dense-z   0.1% mask done the naive way: a full-size z multiplied by a 0/1 mask
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("forward", "full-rademacher", "full-gaussian", "sparse", "sparse-dense-z")


class DenseZMasked:
    """The naive sparse ZO (for comparison only): full-size z times a 0/1 mask, in place."""

    def __init__(self, params, mask):
        from zobench.zo.directions import draw, make_generator

        self.draw, self.gen = draw, make_generator
        self.params = [p for _, p in params]
        self.masks = []
        for name, p in params:
            m = torch.zeros(p.numel(), dtype=p.dtype)
            if name in mask:
                m[mask[name]] = 1
            self.masks.append(m.view(p.shape))
        self.numel = sum(int(m.sum()) for m in self.masks)

    @torch.no_grad()
    def _pass(self, seed, coef):
        g = self.gen(seed)
        for p, m in zip(self.params, self.masks):
            z = torch.randn(p.shape, generator=g) * m
            p.add_(z, alpha=coef)

    def apply(self, seed, scale):
        self._seed, prev = seed, getattr(self, "_scale", 0.0)
        self._pass(seed, scale - prev)
        self._scale = scale

    def update(self, grads, optimizer, step):
        (seed, g), = grads
        self._pass(seed, -self._scale - optimizer.lr(step) * g)
        self._scale = 0.0


def make_steppers(model, batch_loss):
    from zobench.zo import masks as M
    from zobench.zo.optim import make_optimizer
    from zobench.zo.trainable import DenseTrainable, SparseTrainable
    from zobench.zo.trainer import ForwardOnly, ZOTrainer

    allp = M.scoped_params(model, "all")
    linear = M.scoped_params(model, "linear")
    mask = M.random_mask(linear, 1e-3, seed=0)

    def zo(trainable):
        return ZOTrainer(model, trainable, make_optimizer("sgd", 1e-7), batch_loss, eps=1e-3)

    def lezo(fraction: float):
        from zobench.methods.lezo import LayerSubset, units

        parts = [DenseTrainable(g, "rademacher", tag=f"u{u}") for u, g in enumerate(units(allp))]
        return zo(LayerSubset(parts, max(1, round(fraction * len(parts)))))

    return {
        "forward": lambda: ForwardOnly(model, batch_loss),
        "full-rademacher": lambda: zo(DenseTrainable(allp, "rademacher")),
        "full-gaussian": lambda: zo(DenseTrainable(allp, "gaussian")),
        "lezo-0.25": lambda: lezo(0.25),
        "sparse": lambda: zo(SparseTrainable(linear, mask)),
        "sparse-dense-z": lambda: zo(DenseZMasked(linear, mask)),
    }


def setup(model_spec: str):
    from zobench.models import load_model
    from zobench.zo.mask_build import lm_loss

    torch.set_num_threads(2)
    loaded = load_model(model_spec)
    batch = torch.randint(0, loaded.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0))
    return loaded.model, batch, lm_loss


def child(variant: str, model_spec: str) -> None:
    """Peak RSS of `steps` steps of one variant, printed as JSON (run in a fresh process)."""
    from zobench.measure.memory import PeakMemory

    model, batch, loss = setup(model_spec)
    stepper = make_steppers(model, loss)[variant]()
    stepper.step(batch, 0)  # warm-up: first-touch allocations, lazy inits
    with PeakMemory() as mem:
        for i in range(2):
            stepper.step(batch, i + 1)
    print(json.dumps(mem.result))


def timings(model_spec: str, rounds: int) -> dict[str, list[float]]:
    model, batch, loss = setup(model_spec)
    steppers = {k: f() for k, f in make_steppers(model, loss).items()}
    for s in steppers.values():
        s.step(batch, 0)
    out = {k: [] for k in steppers}
    parts = {k: {} for k in steppers}
    for r in range(rounds):
        for k, s in steppers.items():
            res = s.step(batch, r + 1)
            out[k].append(res.total_s)
            for p, v in res.seconds.items():
                parts[k].setdefault(p, []).append(v)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in out.items()),
              file=sys.stderr, flush=True)
    return out, parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.model)

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="2")
    mem = {}
    for v in VARIANTS:
        r = subprocess.run([sys.executable, __file__, "--child", v, "--model", args.model],
                           env=env, capture_output=True, text=True, check=True)
        mem[v] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mib"]
        print(f"  peak RSS {v}: {mem[v]:.0f} MiB", file=sys.stderr, flush=True)
    times, parts = timings(args.model, args.rounds)

    fwd = statistics.median(times["forward"])
    rows = []
    print(f"\nZO step vs forward, {args.model}, batch 16x32, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds (median [min-max])")
    print(f"{'variant':16s} {'step ms':>22s} {'x 2 fwd':>8s} {'peak MiB':>9s} {'x infer':>8s}  breakdown (median ms)")
    for v in VARIANTS:
        ts = sorted(times[v])
        med = statistics.median(ts)
        row = {"variant": v, "median_ms": med * 1000, "min_ms": ts[0] * 1000, "max_ms": ts[-1] * 1000,
               "x_two_forwards": med / (2 * fwd), "peak_rss_mib": mem[v], "x_inference_peak": mem[v] / mem["forward"],
               "parts_ms": {p: statistics.median(x) * 1000 for p, x in parts[v].items()}}
        rows.append(row)
        br = " ".join(f"{p}={x:.0f}" for p, x in row["parts_ms"].items())
        print(f"{v:16s} {med * 1000:8.0f} [{ts[0] * 1000:5.0f}-{ts[-1] * 1000:5.0f}] "
              f"{row['x_two_forwards']:8.2f} {mem[v]:9.0f} {row['x_inference_peak']:8.2f}  {br}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "rounds": args.rounds, "threads": 2,
                                               "batch": [16, 32], "when": time.strftime("%Y-%m-%d"),
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
