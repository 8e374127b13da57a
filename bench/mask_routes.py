"""Benchmark: the sensitive mask built on the whole float model against the one built block by block.

    python bench/mask_routes.py [--model smollm2] [--density 1e-3] [--json results/bench/mask_routes.json]

Each route runs in a fresh child process (its peak RSS is its own): ``whole`` loads the float model and sums
the squared gradients of every block linear at once (``zo.masks.squared_gradients``); ``layer by layer``
leaves the block linears in the checkpoint (or undrawn, for ``random:`` models) and computes the same sums
one block at a time (``models.layerwise``). Both read the packaged C4 slice (16 x 256 tokens, the suites'
calibration). Reported: each route's peak RSS and seconds, and how far the masks agree: the overlap of the
two top-k sets, the largest relative difference of any score, and the squared-gradient mass each covers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchio import emit

from zobench.data.calibration import corpus_batches, find_corpus
from zobench.measure.memory import PeakMemory
from zobench.models import layerwise, load_model
from zobench.procs import RELEASE_ENV
from zobench.zo import masks as M
from zobench.zo.mask_build import lm_loss

ROOT = Path(__file__).resolve().parents[1]


def child(route: str, model: str, out: Path, n_seq: int, seq_len: int) -> None:
    with PeakMemory("cpu") as peak:
        start = time.perf_counter()
        loaded = load_model(model, defer_linears=route == "layer by layer")
        params = M.scoped_params(loaded.model, "linear")
        vocab = loaded.vocab_size if loaded.random_weights else None
        batches = corpus_batches(find_corpus(None, None), loaded.tokenizer, n_seq, seq_len, vocab)
        if route == "whole":
            scores = M.squared_gradients(loaded.model, params, batches, lm_loss)
        else:
            assert loaded.deferred is not None, "the model did not stream"
            scores = dict(layerwise.squared_gradients(loaded.model, loaded.deferred, batches, [n for n, _ in params]))
        seconds = time.perf_counter() - start
    torch.save({"scores": scores, "seconds": seconds, "peak_rss_mib": peak.result.get("peak_rss_mib")}, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--calib", default="16x256", help="sequences x tokens")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=2, metavar=("ROUTE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    n_seq, seq_len = (int(x) for x in args.calib.split("x"))
    if args.child:
        child(args.child[0], args.model, Path(args.child[1]), n_seq, seq_len)
        return
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for route in ("whole", "layer by layer"):
            out = Path(tmp) / f"{route.replace(' ', '-')}.pt"
            subprocess.run([sys.executable, __file__, "--model", args.model, "--calib", args.calib,
                            "--child", route, str(out)], check=True, cwd=ROOT,
                           env={**os.environ, **RELEASE_ENV})
            runs[route] = torch.load(out)
    a, b = runs["whole"]["scores"], runs["layer by layer"]["scores"]
    total = sum(t.numel() for t in a.values())
    mass_a, mass_b = {}, {}
    mask_a = M.topk_mask(a.items(), args.density, total=total, mass=mass_a)
    mask_b = M.topk_mask(b.items(), args.density, total=total, mass=mass_b)
    flat = {n: set(i.tolist()) for n, i in mask_a.items()}
    common = sum(len(flat.get(n, set()) & set(i.tolist())) for n, i in mask_b.items())
    k = sum(len(s) for s in flat.values())
    rel = max(float(((a[n] - b[n]).abs() / a[n].abs().clamp_min(1e-30)).max()) for n in a)
    summary = {
        "model": args.model, "density": args.density, "calibration": args.calib, "k": k,
        "overlap": common / k if k else None, "max_rel_score_diff": rel,
        "mass_whole": mass_a["covered"] / mass_a["total"], "mass_layerwise": mass_b["covered"] / mass_b["total"],
        "routes": {r: {"peak_rss_mib": v["peak_rss_mib"], "seconds": v["seconds"]} for r, v in runs.items()},
        "threads": torch.get_num_threads(),
    }
    emit(summary, args.json)


if __name__ == "__main__":
    main()
