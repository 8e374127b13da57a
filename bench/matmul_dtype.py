"""Are bfloat16 matrix products faster than float32 on this CPU? SmolLM2-sized products, 2 threads.

    python bench/matmul_dtype.py

Prints the median of 7 timed products per shape and dtype (after 3 warm-up products) and the ratio.
Without native bfloat16 instructions (AVX512_BF16 / AMX) torch emulates them, and a suite should stay
in float32 on such a CPU; with them, bfloat16 weights (with float32 master values for the trained
entries, as the sparse path keeps) may pay.
"""

from __future__ import annotations

import statistics
import time

import torch

SHAPES = {"attention projection (1024 x 576 x 576)": (1024, 576, 576),
          "MLP projection (1024 x 576 x 1536)": (1024, 576, 1536),
          "head at 32 positions (32 x 576 x 49152)": (32, 576, 49152)}


def median_ms(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(7):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    flags = {f for f in open("/proc/cpuinfo").read().split() if "bf16" in f or f == "avx512f"}
    print(f"CPU flags: {', '.join(sorted(flags)) or 'no avx512f, no bf16 instructions'}")
    for name, (m, k, n) in SHAPES.items():
        fp32, bf16 = median_ms(m, k, n, torch.float32), median_ms(m, k, n, torch.bfloat16)
        print(f"{name}: float32 {fp32:.1f} ms, bfloat16 {bf16:.1f} ms, bfloat16 / float32 {bf16 / fp32:.1f}")


if __name__ == "__main__":
    main()
