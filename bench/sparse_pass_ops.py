"""Benchmark: the torch ops (on a GPU, kernel launches) of one sparse perturbation, a pass per tensor or one
pass over every tensor's values.

    python bench/sparse_pass_ops.py [--tensors 224] [--nnz 6476005] [--device cpu|cuda] [--json PATH]

On a GPU the fused passes run the torch fallback (``zobench.zo.philox``): Philox as tensor ops, ~100 of them
a pass whatever its length. A 7B random 0.1% mask touches all 224 block linears; on an H200 its perturbation
took 773 ms (``results/gpu/gpu-check.jsonl``), a sensitive mask over 7 tensors 30 ms. This counts the ops
``SparseTrainable.apply`` dispatches (torch.profiler) with the mask spread evenly over ``--tensors`` float16
tensors, both ways, and times them (median of 5; on a CPU the times are only the ops' dispatch and work there,
not a GPU's launch latency), and checks that both ways write the same values. Then the same for the values
a dense-and-sparse model keeps beside its quantized layers (a vector per layer): in one pass and written
layer by layer, or packed end to end in one buffer (``quant.sparse.pack_values``), written at once.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from benchio import emit
from torch.profiler import ProfilerActivity, profile

from zobench.zo import fused
from zobench.zo.trainable import SparseTrainable


def build(tensors: int, nnz: int, device: torch.device):
    """A mask's entries in float weights: ``tensors`` weights, each a quarter selected."""
    per = max(1, nnz // tensors)
    params = [(f"t{i}", torch.nn.Parameter(torch.zeros(4 * per, dtype=torch.float16, device=device),
                                           requires_grad=False)) for i in range(tensors)]
    mask = {n: torch.arange(0, 4 * per, 4, device=device) for n, _ in params}
    return params, SparseTrainable(params, mask, "rademacher")


def build_values(tensors: int, nnz: int, device: torch.device, packed: bool):
    """The values kept beside ``tensors`` quantized layers (dense-and-sparse): a vector each, or views of one
    buffer as ``quant.sparse.pack_values`` lays them."""
    per = max(1, nnz // tensors)
    flat = torch.zeros(per * tensors, dtype=torch.float16, device=device)
    vectors = [(f"v{i}", flat[i * per:(i + 1) * per] if packed else torch.zeros(per, dtype=torch.float16,
                                                                                device=device))
               for i in range(tensors)]
    return vectors, SparseTrainable.of_vectors(vectors, "rademacher")


def measure(t: SparseTrainable, one_pass: bool, device: torch.device) -> dict:
    t._one_pass = lambda: one_pass  # the way under test, whatever this device would choose

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t.apply(1, 1e-3)
        sync()
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)  # top level
    times = []
    for seed in range(5):
        sync()
        start = time.perf_counter()
        t.apply(seed + 2, 1e-3)
        sync()
        times.append(time.perf_counter() - start)
    return {"top_level_ops": ops, "median_ms": round(1e3 * statistics.median(times), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=224)
    ap.add_argument("--nnz", type=int, default=6_476_005)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    out = {"device": args.device, "tensors": args.tensors, "nnz": args.nnz, "threads": torch.get_num_threads()}
    written = {}
    with fused.torch_fallback():
        for way, one in (("per_tensor", False), ("one_pass", True)):
            params, t = build(args.tensors, args.nnz, device)
            out[way] = measure(t, one, device)
            t.apply(99, 1e-3)
            written[way] = torch.cat([p.detach().view(-1) for _, p in params])
        for way, packed in (("values_one_pass", False), ("values_packed", True)):
            vectors, t = build_values(args.tensors, args.nnz, device, packed)
            assert (t.flat is not None) == packed
            out[way] = measure(t, True, device)
            t.apply(99, 1e-3)
            written[way] = torch.cat([v.view(-1) for _, v in vectors])
    out["same_values"] = torch.equal(written["per_tensor"], written["one_pass"])
    out["same_values_packed"] = torch.equal(written["values_one_pass"], written["values_packed"])
    emit(out, args.json)


if __name__ == "__main__":
    main()
