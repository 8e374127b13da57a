"""Benchmark: the memory bitsandbytes' CPU 4-bit quantization needs beyond the layer it quantizes.

    python bench/quantize_transient.py [--shape 11008x4096]

Each dtype in a fresh process: the layer is made, the peak RSS mark reset (/proc/self/clear_refs), one
``quantize_4bit`` (NF4, double-quantized absmax, blocks of 64) run, and the rise of the peak over the
resident set before it printed, in MiB and in bytes per weight (``quant.bnb``'s ``quantize_transient``
prices the largest layer with these). Linux only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import bitsandbytes.functional as F
import torch


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split(f"{key}:")[1].split()[0]) / 1024


def child(dtype: str, rows: int, cols: int) -> None:
    w = torch.randn(rows, cols).to(getattr(torch, dtype))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    rise = _status("VmHWM") - base
    print(f"{dtype}: layer {w.numel() * w.element_size() / 2**20:.0f} MiB, quantizing it needs {rise:.0f} MiB more "
          f"({rise * 2**20 / w.numel():.1f} bytes a weight)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="11008x4096")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows, cols = (int(x) for x in args.shape.split("x"))
    if args.child:
        child(args.child, rows, cols)
        return
    for dtype in ("float32", "float16", "bfloat16"):
        subprocess.run([sys.executable, __file__, "--shape", args.shape, "--child", dtype], check=True)


if __name__ == "__main__":
    main()
