"""Benchmark: the global top-k's memory beyond the scores, before (torch.topk and sort-based merges) and now.

    python bench/topk_memory.py [--device cpu|cuda] [--layers 4] [--json results/bench/topk_memory.json]

``zo.masks.topk_mask`` streams score tensors (a sensitive mask's squared gradients, one block linear at a time)
through a running k-best. Here the scores are synthetic with Llama-2-7B's shapes (``--layers`` blocks of 7
linears, exponential values drawn per tensor from a seed) and k is the whole 7B's 0.1% (6.5M), so the merges
are the 7B mask's largest. ``before`` is the running top-k as it was (a ``torch.topk`` of the first tensor
whole, then every merge dropping its surplus by another ``torch.topk``), ``now`` is ``topk_mask``, and
``now_kthvalue`` (on a GPU) or ``now_topk`` (on a CPU) is ``topk_mask`` finding each merge's k-th largest the
other device's way (``zo.masks._kth_largest``). Each runs
in a child process; reported: its peak memory beyond the one score tensor alive at a time (host RSS on a CPU,
the allocator's peak on a GPU), seconds, whether both select the same entries, and where they do not (ties
at the k-th value broken differently), whether the values they selected are the same.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from benchio import emit

from zobench.procs import RELEASE_ENV
from zobench.zo import masks as M

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
HIDDEN, INTER, K_7B = 4096, 11008, 6_476_005
SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(INTER, HIDDEN)] * 2 + [(HIDDEN, INTER)]


def scores(layers: int, device: torch.device):
    for layer in range(layers):
        for j, shape in enumerate(SHAPES):
            g = torch.Generator(device=device).manual_seed(1000 * layer + j)
            yield f"{layer}.{j}", torch.empty(shape, device=device).exponential_(generator=g)


def before(named, k: int):
    """The running top-k before this bench (zo.masks at 05f29bb), for the comparison."""
    best_v = best_t = best_i = None
    names = []
    for t, (name, s) in enumerate(named):
        names.append(name)
        flat = s.reshape(-1).float()
        if best_v is not None and best_v.numel() >= k:
            i = torch.nonzero(flat > best_v.min().to(flat.device)).squeeze(1)
            v = flat[i]
        elif flat.numel() <= k:
            v, i = flat, torch.arange(flat.numel(), device=flat.device)
        else:
            v, i = torch.topk(flat, k)
        if not v.numel():
            continue
        if best_v is None:
            best_v, best_t, best_i = v, torch.full_like(i, t), i
        else:
            best_v = torch.cat([best_v, v])
            best_t = torch.cat([best_t, torch.full_like(i, t)])
            best_i = torch.cat([best_i, i])
        if best_v.numel() > k:
            keep = torch.ones(best_v.numel(), dtype=torch.bool, device=best_v.device)
            keep[torch.topk(best_v, best_v.numel() - k, largest=False).indices] = False
            best_v, best_t, best_i = best_v[keep], best_t[keep], best_i[keep]
    best_t, best_i = best_t.cpu(), best_i.cpu()
    return {n: torch.sort(best_i[best_t == t]).values for t, n in enumerate(names) if (best_t == t).any()}


def child(way: str, device: str, layers: int, out: Path) -> None:
    dev = torch.device(device)
    total = layers * sum(o * i for o, i in SHAPES)
    one = max(o * i for o, i in SHAPES) * 4 / MIB  # the largest score tensor, alive while it is read
    torch.zeros(1, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if way == "before":
        mask = before(scores(layers, dev), K_7B)
    else:  # now: the k-th largest as this device finds it; the other way forced for the comparison
        if way != "now":
            kth = M._kth_largest
            M._kth_largest = lambda values, k, _=None: kth(values, k, way == "now_topk")
        mask = M.topk_mask(scores(layers, dev), K_7B / total, total=total)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / MIB
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / MIB
    seconds = time.perf_counter() - start
    torch.save({"mask": mask, "seconds": seconds, "beyond_scores_mib": peak - one}, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=2, metavar=("WAY", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.device, args.layers, Path(args.child[1]))
        return
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        ways = ("before", "now", "now_kthvalue" if args.device.startswith("cuda") else "now_topk")
        for way in ways:
            out = Path(tmp) / f"{way}.pt"
            subprocess.run([sys.executable, __file__, "--device", args.device, "--layers", str(args.layers),
                            "--child", way, str(out)], check=True, cwd=ROOT,
                           env={**os.environ, **RELEASE_ENV})
            runs[way] = torch.load(out)
    a, b = runs["before"]["mask"], runs["now"]["mask"]
    same = a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    c = runs[ways[2]]["mask"]  # the other way of finding the k-th largest: the same mask, ties included
    same_other = b.keys() == c.keys() and all(torch.equal(b[n], c[n]) for n in b)
    # Ties at the k-th value may be broken differently (torch.topk: any of them; now: the earliest), so
    # also count the entries the two disagree on and compare the values they selected, sorted.
    differ, vals = 0, {"before": [], "now": []}
    for name, s in scores(args.layers, torch.device(args.device)):
        flat = s.reshape(-1).cpu()
        ia, ib = a.get(name, torch.empty(0, dtype=torch.long)), b.get(name, torch.empty(0, dtype=torch.long))
        differ += int((~torch.isin(ia, ib)).sum()) + int((~torch.isin(ib, ia)).sum())
        vals["before"].append(flat[ia])
        vals["now"].append(flat[ib])
    same_values = torch.equal(torch.sort(torch.cat(vals["before"])).values, torch.sort(torch.cat(vals["now"])).values)
    summary = {"device": args.device, "layers": args.layers, "k": K_7B, "same_mask": same,
               f"same_mask_{ways[2]}": same_other,
               "entries_differing": differ, "same_selected_values": same_values,
               "threads": torch.get_num_threads(),
               **{way: {"beyond_scores_mib": round(r["beyond_scores_mib"], 1), "seconds": round(r["seconds"], 2)}
                  for way, r in runs.items()}}
    emit(summary, args.json)


if __name__ == "__main__":
    main()
