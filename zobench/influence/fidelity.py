"""How faithful are compressed gradient scores to exact ones? (numbers only)

``fidelity``: the RapidGrad sketch against the exact scores of the same scope, over a K sweep, with and
without layer-wise normalization and the permutation.

``subspace_vs_sketch``: the ZO part's sensitive 0.1% mask is itself a compression of the gradient (keep
the masked entries, drop the rest). Against exact full-gradient scores, compare it with a sketch of the
full gradient holding the same bytes per example (K = the mask's nnz, float16 both: the mask's indices
are shared by all examples, so they cost nothing per example).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from zobench.influence import metrics as MX
from zobench.influence.grads import _strip, normalize_segments_
from zobench.influence.session import Session
from zobench.influence.sketch import SketchConfig, Sketcher


def _agreement(approx: np.ndarray, exact: np.ndarray, top: int) -> dict:
    return {"spearman": float(np.mean([MX.spearman(a, b) for a, b in zip(approx, exact)])),
            "topk_overlap": float(np.mean([MX.topk_overlap(a, b, top) for a, b in zip(approx, exact)])),
            "top": top}


def _raw_exact(session, examples: list[dict], queries: list[tuple[dict, str]]):
    streamer = session.streamer
    streamer.normalize = False
    try:
        rows = torch.stack([session.exact(session.encode(e)) for e in examples])
        qs = torch.stack([session.exact(session.encode_query(q, g)) for q, g in queries])
    finally:
        streamer.normalize = session.spec.normalize
    return rows, qs


def fidelity(session, examples: list[dict], queries: list[tuple[dict, str]], ks: list[int], top: int = 10) -> dict:
    """Sketched against exact scores (same scope) for each K, normalization on/off, permutation on/off.

    Exact gradients are taken raw once and normalized per tensor here, so every variant scores the same
    gradients.
    """
    scope = session.scope
    rows, qs = _raw_exact(session, examples, queries)
    out = []
    for norm in (True, False):
        r, q = rows.clone(), qs.clone()
        if norm:
            normalize_segments_(r, scope.offsets, scope.sizes)
            normalize_segments_(q, scope.offsets, scope.sizes)
        exact = (q @ r.T).numpy()
        for permute in (True, False):
            for k in ks:
                if k > scope.dim:
                    continue
                sk = Sketcher(SketchConfig(dim=scope.dim, k=k, seed=session.spec.sketch_seed, permute=permute))
                approx = (torch.stack([sk.sketch(v) for v in q]) @ torch.stack([sk.sketch(v) for v in r]).T).numpy()
                out.append({"normalize": norm, "permute": permute, "k": k, **_agreement(approx, exact, top)})
    return {"n": len(examples), "queries": len(queries), "dim": scope.dim, "sweep": out}


def subspace_vs_sketch(spec, examples: list[dict], queries: list[tuple[dict, str]], top: int = 10) -> dict:
    """The sensitive mask's entries vs a sketch of equal bytes, both against exact full-gradient scores.

    Streams one full gradient at a time (the model's size in float32) against the queries' full
    gradients, so memory is (queries + 1) full gradients, whatever the number of examples.
    """
    full = Session(replace(spec, scope="all", normalize=False), with_mask=True)
    mask = full.mask  # the plain model's mask, as the ZO part uses it
    scope = full.scope
    where = {_strip(n): i for i, n in enumerate(scope.names)}
    sel, seg_sizes = [], []
    for pname, idx in mask.items():
        if idx.numel():
            i = where[pname]
            sel.append(scope.offsets[i] + idx.to(torch.long))
            seg_sizes.append(idx.numel())
    sel = torch.cat(sel)
    seg_offsets = [sum(seg_sizes[:i]) for i in range(len(seg_sizes))]
    nnz = int(sel.numel())
    # The whole flat gradient is one span: plan it all (5 bytes per coordinate), or every example would
    # rehash D indices (tens of seconds each on a CPU: results/bench/measurements.md).
    sketcher = Sketcher(SketchConfig(dim=scope.dim, k=nnz, seed=spec.sketch_seed), plan_limit=scope.dim)

    def views(enc):
        g = full.exact(enc)
        sub = normalize_segments_(g[sel].clone(), seg_offsets, seg_sizes)
        normalize_segments_(g, scope.offsets, scope.sizes)
        return g, sub, sketcher.sketch(g)

    q_full, q_sub, q_sk = zip(*(views(full.encode_query(q, g)) for q, g in queries))
    q_full, q_sub, q_sk = torch.stack(q_full), torch.stack(q_sub), torch.stack(q_sk)
    exact, sub, sk = [], [], []
    for e in examples:
        g, s, k = views(full.encode(e))
        exact.append(q_full @ g)
        sub.append(q_sub @ s)
        sk.append(q_sk @ k)
        del g
    exact, sub, sk = (torch.stack(x, dim=1).numpy() for x in (exact, sub, sk))
    return {"n": len(examples), "queries": len(queries), "dim": scope.dim, "nnz": nnz,
            "bytes_per_example": 2 * nnz, "density": spec.density,
            "sensitive_subspace": _agreement(sub, exact, top), "sketch_equal_bytes": _agreement(sk, exact, top)}
