"""Benchmark: the sparse part of a dense-and-sparse layer against the quantized layer it sits beside.

For each layer shape (SmolLM2-135M's MLP and attention, Llama-2-7B's) and each backend, times, interleaved
round-robin in one process: the quantized layer's forward, the sparse product ``x @ S^T`` at the given
density by each of the layer's two ways (a dense-times-CSR product, and gather + index_add_; the layer uses
CSR where torch has a kernel), the whole ``SparseDelta`` forward that way, and, for formats that dequantize
in their batched forward (bitsandbytes 4-bit), the whole layer by merging S into the dequantized weight
(the layer's way on CUDA). The input is a ZO training batch's
activations (16 examples x 2 options x 64 tokens by default, as in the smollm2 suite). Reports medians and
the ratio sparse / quantized for each way. On CUDA every timing is closed by ``torch.cuda.synchronize``.

    python bench/sparse_delta.py [--rounds 7] [--density 1e-3] [--device cpu|cuda] [--dtype float32|float16|bfloat16]
                                 [--json results/bench/sparse_delta.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from benchio import keep

SHAPES = {  # name: (in_features, out_features)
    "smollm2.up_proj": (576, 1536),
    "smollm2.down_proj": (1536, 576),
    "llama7b.q_proj": (4096, 4096),
    "llama7b.up_proj": (4096, 11008),
}


def build(shape: tuple[int, int], backend: str, density: float, dtype: torch.dtype, device: str = "cpu"):
    from zobench.quant import QuantContext, get_backend
    from zobench.quant.sparse import SparseDelta, split_selected

    in_f, out_f = shape
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False).to(dtype)
    holder = torch.nn.Sequential(lin)
    nnz = int(round(density * in_f * out_f))
    mask = {"0.weight": torch.randperm(in_f * out_f, generator=g)[:nnz].sort().values}
    idx, values = split_selected(holder, mask)["0"]
    base = lin.to(device) if backend == "none" else \
        get_backend(backend).quantize_linear(lin, QuantContext(device=device, dtype=dtype))
    layer = SparseDelta(base, idx.to(device), values.to(device), in_f, out_f, dtype)
    dequantize = get_backend(backend).dequantize if backend != "none" else None
    merged = SparseDelta(base, idx.to(device), values.to(device), in_f, out_f, dtype, dequantize) \
        if dequantize is not None else None
    return base, layer, merged


def works(fn) -> bool:
    """Whether torch has a kernel for this way on this device and dtype."""
    try:
        fn()
        return True
    except (NotImplementedError, RuntimeError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--tokens", type=int, default=16 * 2 * 64)  # SST-2: 16 examples x 2 options x 64
    ap.add_argument("--backends", default="none,nf4,int8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype, cuda = getattr(torch, args.dtype), args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for shape_name, shape in SHAPES.items():
        x = torch.randn(args.tokens, shape[0], device=args.device, dtype=dtype)
        for backend in args.backends.split(","):
            base, layer, merged = build(shape, backend, args.density, dtype, args.device)
            variants = {"quantized": lambda: base(x), "csr": lambda: layer.csr_product(x),
                        "gather": lambda: layer.gather_product(x), "dense_and_sparse": lambda: layer(x)}
            if merged is not None:  # the whole layer by merging S into the dequantized weight (quant.sparse)
                variants["merge"] = lambda: merged(x)
            with torch.inference_mode():
                variants = {k: fn for k, fn in variants.items() if works(fn)}  # also the warm-up
                times: dict[str, list[float]] = {k: [] for k in variants}
                for _ in range(args.rounds):
                    for k, fn in variants.items():
                        sync()
                        t = time.perf_counter()
                        fn()
                        sync()
                        times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            row = {"layer": shape_name, "backend": backend, "nnz": layer.nnz, **{f"{k}_ms": v for k, v in med.items()},
                   **{f"{k}_over_quantized": med[k] / med["quantized"] for k in ("csr", "gather", "dense_and_sparse",
                                                                                  "merge") if k in med}}
            rows.append(row)
            ways = "  ".join(f"{k} {med[k]:7.3f} ms ({med[k] / med['quantized']:.3f}x)" for k in ("csr", "gather")
                             if k in med)
            merge = f"  merge {med['merge']:8.3f} ms ({med['merge'] / med['quantized']:.3f}x)" if "merge" in med else ""
            print(f"{shape_name:18s} {backend:5s} nnz={layer.nnz:6d}  quantized {med['quantized']:8.3f} ms  "
                  f"{ways}  dense+sparse {med['dense_and_sparse']:8.3f} ms{merge}")
    if args.json:
        meta = {"tokens": args.tokens, "density": args.density, "rounds": args.rounds, "device": args.device,
                "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if cuda else None}
        keep({"meta": meta, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
