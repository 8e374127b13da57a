"""Benchmark: the sparse part of a dense-and-sparse layer against the quantized layer it sits beside.

For each layer shape (SmolLM2-135M's MLP and attention, Llama-2-7B's) and each backend, times, interleaved
round-robin in one process: the quantized layer's forward, the sparse product ``x @ S^T`` at the given
density, and the whole ``SparseDelta`` forward. The input is a ZO training batch's activations (16 examples x 2 options x 64 tokens by
default, as in the smollm2 suite). Reports medians and the ratio sparse / quantized.

    python bench/sparse_delta.py [--rounds 7] [--density 1e-3] [--json results/bench/sparse_delta.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SHAPES = {  # name: (in_features, out_features)
    "smollm2.up_proj": (576, 1536),
    "smollm2.down_proj": (1536, 576),
    "llama7b.q_proj": (4096, 4096),
    "llama7b.up_proj": (4096, 11008),
}


def build(shape: tuple[int, int], backend: str, density: float, dtype: torch.dtype):
    from zobench.quant import QuantContext, get_backend
    from zobench.quant.sparse import SparseDelta, split_selected

    in_f, out_f = shape
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False).to(dtype)
    holder = torch.nn.Sequential(lin)
    nnz = int(round(density * in_f * out_f))
    mask = {"0.weight": torch.randperm(in_f * out_f, generator=g)[:nnz].sort().values}
    idx, values = split_selected(holder, mask)["0"]
    base = lin if backend == "none" else get_backend(backend).quantize_linear(lin, QuantContext(dtype=dtype))
    return base, SparseDelta(base, idx, values, in_f, out_f, dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--tokens", type=int, default=16 * 2 * 64)  # SST-2: 16 examples x 2 options x 64
    ap.add_argument("--backends", default="none,nf4,int8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape_name, shape in SHAPES.items():
        x = torch.randn(args.tokens, shape[0])
        for backend in args.backends.split(","):
            base, layer = build(shape, backend, args.density, torch.float32)
            variants = {"quantized": lambda: base(x), "sparse_product": lambda: layer.sparse_product(x),
                        "dense_and_sparse": lambda: layer(x)}
            times: dict[str, list[float]] = {k: [] for k in variants}
            with torch.inference_mode():
                for fn in variants.values():
                    fn()  # warm-up
                for _ in range(args.rounds):
                    for k, fn in variants.items():
                        t = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            row = {"layer": shape_name, "backend": backend, "nnz": layer.nnz, **{f"{k}_ms": v for k, v in med.items()},
                   "sparse_over_quantized": med["sparse_product"] / med["quantized"]}
            rows.append(row)
            print(f"{shape_name:18s} {backend:5s} nnz={layer.nnz:6d}  quantized {med['quantized']:8.2f} ms  "
                  f"sparse {med['sparse_product']:7.2f} ms  ({row['sparse_over_quantized']:.3f}x)  "
                  f"dense+sparse {med['dense_and_sparse']:8.2f} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {"tokens": args.tokens, "density": args.density, "rounds": args.rounds,
                "threads": torch.get_num_threads(), "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
