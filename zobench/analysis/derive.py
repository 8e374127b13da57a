"""Ratios derived from a set of records when they are read, never frozen into a record at write time.

    peak_mib                the training peak of warm-up/train: on a GPU the device memory the driver reported
                            (NVML) where recorded, else CUDA max allocated; on a CPU peak RSS
    peak_kind               which of those it is: device | allocated | rss
    peak_over_inference     peak_mib over the forward reference cell's
    step_over_two_forwards  step median over two inference forwards: the cell's own reference forwards
                            (timed right after each step, ``forward_ref`` "in-cell"), else the forward
                            reference cell's step median (``forward_ref`` "forward cell")
    speedup_vs_full         the full-ZO cell's step median over this cell's

A cell's references are the ok records sharing its ``reference_key`` (model, dtype, quant, task, batch,
length, device, seed). Each cell's latest record counts, and where several cells could serve as a
reference the one with the smallest cell id does: the result depends on the set of records, not on the
order in which cells ran, finished or were appended.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from zobench.cell.record import CellRecord

TRAIN_PHASES = ("warmup", "train")
SPEEDUP_BASELINE = "full"  # the method speedups are measured against (MeZO)


@dataclass
class Derived:
    peak_mib: float | None = None
    peak_kind: str | None = None
    peak_over_inference: float | None = None
    step_over_two_forwards: float | None = None
    forward_ref: str | None = None
    speedup_vs_full: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def is_cuda(rec: CellRecord) -> bool:
    return str(rec.device or rec.config.get("device") or "cpu").startswith("cuda")


PEAK_KEYS = {"device": "device_peak_mib", "allocated": "cuda_max_allocated_mib", "rss": "peak_rss_mib"}


def peak_kind(rec: CellRecord) -> str:
    """What a cell's peak means: what the card holds (device) where the driver was sampled, else what the
    allocator handed out (allocated) on a GPU, else the process's resident memory (rss)."""
    if not is_cuda(rec):
        return "rss"
    device = any(getattr(rec.phases[p], "device_peak_mib", None) is not None for p in TRAIN_PHASES
                 if p in rec.phases)
    return "device" if device else "allocated"


def train_peak_mib(rec: CellRecord) -> float | None:
    """The training peak (``peak_kind``), the larger of warm-up and train."""
    key = PEAK_KEYS[peak_kind(rec)]
    vals = [getattr(rec.phases[p], key) for p in TRAIN_PHASES if p in rec.phases]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def latest_by_cell(records: Iterable[CellRecord]) -> list[CellRecord]:
    """The last record of each cell (a resumed or re-run cell supersedes its earlier line)."""
    by: dict[str, CellRecord] = {}
    for r in records:
        by[r.cell_id] = r
    return list(by.values())


def _family(rec: CellRecord) -> str | None:
    from zobench.methods import METHODS

    return METHODS.get(rec.method).family if rec.method in METHODS else None


def _step(rec: CellRecord) -> float | None:
    return rec.metrics.step_s.median if rec.metrics.step_s else None


def derive(records: Iterable[CellRecord]) -> dict[str, Derived]:
    """``{cell_id: Derived}`` for every cell in ``records`` (see the module docstring)."""
    from zobench.spec.matrix import reference_key

    def key(r: CellRecord) -> tuple:  # learning-rate pilots are compared among themselves only
        return (*reference_key(r.config), r.labels.get("stage"))

    latest = sorted(latest_by_cell(records), key=lambda r: r.cell_id)
    # One pass: each group's reference and full-ZO cell (the smallest cell id of each), so that deriving
    # is linear in the number of records (100,000 records take seconds, not hours)
    forwards: dict[tuple, CellRecord] = {}
    fulls: dict[tuple, CellRecord] = {}
    keys = {}
    for r in latest:
        keys[r.cell_id] = k = key(r)
        if r.ok and _family(r) == "reference":
            forwards.setdefault(k, r)
        if r.ok and r.method == SPEEDUP_BASELINE:
            fulls.setdefault(k, r)
    return {rec.cell_id: _ratios(rec, forwards.get(keys[rec.cell_id]), fulls.get(keys[rec.cell_id]))
            for rec in latest}


def _ratios(rec: CellRecord, forward: CellRecord | None, full: CellRecord | None) -> Derived:
    d = Derived(peak_mib=train_peak_mib(rec), peak_kind=peak_kind(rec) if rec.phases else None)
    if not rec.ok:
        return d
    step = _step(rec) if _family(rec) != "reference" else None  # the reference is not compared with itself
    in_cell = rec.metrics.forward_ref_s.median if rec.metrics.forward_ref_s else None
    if step and in_cell:
        d.step_over_two_forwards, d.forward_ref = step / (2 * in_cell), "in-cell"
    elif step and forward is not None and _step(forward):
        d.step_over_two_forwards, d.forward_ref = step / (2 * _step(forward)), "forward cell"
    fwd_peak = train_peak_mib(forward) if forward is not None and forward is not rec else None
    if d.peak_mib and fwd_peak and peak_kind(forward) == d.peak_kind:  # never device over allocated
        d.peak_over_inference = d.peak_mib / fwd_peak
    if step and full is not None and _step(full):  # the full cell itself: 1.00, the column's anchor
        d.speedup_vs_full = _step(full) / step
    return d
