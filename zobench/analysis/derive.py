"""Values derived from records when they are read."""

from __future__ import annotations

TRAIN_PHASES = ("warmup", "train")


def is_cuda(rec: dict) -> bool:
    return str(rec.get("device") or (rec.get("config") or {}).get("device") or "cpu").startswith("cuda")


def train_peak_mib(rec: dict) -> float | None:
    """The training peak: CUDA max allocated on a GPU, else peak RSS, the larger of warm-up and train."""
    key = "cuda_max_allocated_mib" if is_cuda(rec) else "peak_rss_mib"
    phases = rec.get("phases") or {}
    vals = [phases[p][key] for p in TRAIN_PHASES if isinstance(phases.get(p), dict) and key in phases[p]]
    return max(vals) if vals else None
