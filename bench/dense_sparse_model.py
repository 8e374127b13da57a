"""Benchmark: a whole dense-and-sparse NF4 model's forward, the sparse values merged or added apart.

SensZOQ's set-up on the embedded SmolLM2-135M: every block linear quantized to NF4 (bitsandbytes), 0.1% of
its weights (a seeded random mask) kept beside it as trainable float values (``quant.sparse``). Two copies
of that model are built from the same weights and mask: one whose layers add ``x @ S^T`` as a separate CSR
product, one whose layers merge S into the weight they dequantize anyway (``x @ (D + S)^T``). Their forwards,
and the plain NF4 model's (the sparse part bypassed), are timed interleaved round-robin in one process on
one batch of the claims suite's shape (16 sequences of ``--length`` tokens); medians over ``--rounds``,
and the largest difference between the two ways' logits.

    python bench/dense_sparse_model.py [--rounds 7] [--length 64] [--json results/bench/dense_sparse_model.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from benchio import keep


def build(model: torch.nn.Module, mask: dict, merge: bool) -> torch.nn.Module:
    """A copy of ``model`` with NF4 dense-and-sparse block linears, merged or not whatever this CPU is."""
    from zobench.quant import QuantContext, quantize_model
    from zobench.quant.bnb import NF4
    from zobench.zo.masks import linear_layers

    class Way(NF4):
        def merges_on(self, device: str) -> bool:
            return merge

    model = copy.deepcopy(model)
    quantize_model(model, Way(), QuantContext(), linear_layers(model), mask)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from zobench.models.load import load_model
    from zobench.quant.sparse import SparseDelta, sparse_bypassed
    from zobench.zo.masks import random_mask, scoped_params

    loaded = load_model("smollm2")
    mask = random_mask(scoped_params(loaded.model, "linear"), args.density, seed=0)
    models = {"csr": build(loaded.model, mask, merge=False), "merge": build(loaded.model, mask, merge=True)}
    ways = {k: {m.way for m in mdl.modules() if isinstance(m, SparseDelta)} for k, mdl in models.items()}
    assert ways == {"csr": {"csr"}, "merge": {"merge"}}, ways
    del loaded

    ids = torch.randint(3, models["csr"].config.vocab_size, (args.batch, args.length),
                        generator=torch.Generator().manual_seed(0))

    def plain():
        with sparse_bypassed(models["csr"]):
            return models["csr"](input_ids=ids).logits

    variants = {"nf4": plain, "csr": lambda: models["csr"](input_ids=ids).logits,
                "merge": lambda: models["merge"](input_ids=ids).logits}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        out = {k: fn() for k, fn in variants.items()}  # also the warm-up
        diff = (out["csr"] - out["merge"]).abs().max().item()
        moved = (out["csr"] - out["nf4"]).abs().max().item()
        for _ in range(args.rounds):
            for k, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k in variants:
        print(f"{k:6s} forward {med[k]:8.1f} ms  ({med[k] / med['nf4']:.3f}x the plain NF4 model)  "
              f"range {min(times[k]) * 1e3:.1f}-{max(times[k]) * 1e3:.1f}")
    print(f"max |logits csr - logits merge| = {diff:.2e}  (the sparse values move the logits by up to {moved:.2e})")
    if args.json:
        meta = {"model": "smollm2", "batch": args.batch, "length": args.length, "density": args.density,
                "rounds": args.rounds, "threads": torch.get_num_threads(), "torch": torch.__version__}
        rows = {k: {"median_ms": med[k], "over_nf4": med[k] / med["nf4"], "all_ms": [t * 1e3 for t in times[k]]}
                for k in variants}
        keep({"meta": meta, "forward": rows, "max_abs_logit_diff": diff,
              "sparse_moves_logits_by": moved}, args.json)


if __name__ == "__main__":
    main()
