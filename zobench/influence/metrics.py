"""Ranking and agreement measures for influence scores (numbers only)."""

from __future__ import annotations

import numpy as np
import torch


def score_matrix(rows: torch.Tensor, queries: torch.Tensor, metric: str = "cosine") -> np.ndarray:
    """[Q, N] scores of query sketches against row sketches, as ``retrieve.scan`` computes them."""
    r, q = rows.float(), queries.float().reshape(-1, rows.shape[1])
    s = q @ r.T
    if metric == "cosine":
        s = s / q.norm(dim=1, keepdim=True).clamp_min(1e-30) / r.norm(dim=1).clamp_min(1e-30)
    return s.numpy()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``labels`` (Mann-Whitney U, ties halved)."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = _ranks(np.concatenate([pos, neg]))
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top-k(a) & top-k(b)| / k."""
    ta, tb = set(np.argsort(-a)[:k].tolist()), set(np.argsort(-b)[:k].tolist())
    return len(ta & tb) / k


def ranking_metrics(scores: np.ndarray, labels: np.ndarray, k: int) -> dict:
    """Mean over queries of recall@k, precision@k (equal when k = number of positives) and AUROC; the
    worst query's recall and every query's, so one failing query is not hidden in the mean."""
    rec, prec, auc = [], [], []
    n_pos = max(int(labels.sum()), 1)
    for s in np.atleast_2d(scores):
        top = np.argsort(-s)[:k]
        hits = int(labels[top].sum())
        rec.append(hits / n_pos)
        prec.append(hits / k)
        auc.append(auroc(s, labels))
    return {"recall_at_k": float(np.mean(rec)), "precision_at_k": float(np.mean(prec)),
            "auroc": float(np.nanmean(auc)), "k": k, "queries": len(rec),
            "recall_min": float(np.min(rec)), "recall_per_query": [float(r) for r in rec]}
