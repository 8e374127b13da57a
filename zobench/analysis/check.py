"""Budgets (and an optional same-machine baseline) -> violations. `zobench check` exits 1 on any.

Measured cells are checked through the ratios derived from the whole set of records (``derive``), so a
record's ratios never depend on which cells ran before it. Latency is only ever compared against a
baseline measured on the same machine (same CPU/GPU name and thread count).

A cell of the suite without an ok measurement (no record, or e.g. "unsupported: needs a CUDA device" on a
CPU machine) can be checked by its ``Estimate`` (``zobench.analysis.estimate.estimate_missing``, which needs
torch: this module does not, so a check on records loads none): that is how CI holds a 7B budget without a
GPU. Estimates are a separate input, never records, and are held to ``peak_mib_max``
only: the ratio budgets' margins (5-10%) are no wider than the estimator's accuracy, and accuracy and
latency are not predicted at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zobench.cell.measures import estimate_key
from zobench.cell.record import CellRecord
from zobench.results import derive, latest_by_cell, phase_peak
from zobench.spec.selectors import selector_matches
from zobench.spec.suite import Suite

ESTIMATED_LIMITS = ("peak_mib_max",)
PEAK_LIMITS = ("peak_mib_max", "peak_over_inference_max")  # budgets that hold a measured peak
RATIOS = {"peak_mib_max": "peak_mib", "peak_over_inference_max": "peak_over_inference",
          "step_over_two_forwards_max": "step_over_two_forwards"}


@dataclass
class Estimate:
    """A cell's predicted peak, checked in place of a measurement."""

    cell_id: str
    labels: dict
    config: dict
    device: str
    peak_mib: float
    breakdown: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)  # load / mask / quantize / eval / train: each phase's predicted peak

    def peak(self, phases=None) -> float:
        """The predicted peak of the whole cell, or of the named ``phases`` (a record's phase names: warmup and
        train are the estimate's "train", the evaluations its "eval": ``measures.estimate_key``)."""
        if not self.phases:
            return self.peak_mib
        named = {estimate_key(p, self.phases) for p in phases} if phases else set(self.phases)
        found = [v for k, v in self.phases.items() if k in named]
        return max(found) if found else self.peak_mib


@dataclass
class Violation:
    cell: str
    metric: str
    limit: float
    measured: float
    note: str = ""

    def line(self) -> str:
        extra = f" ({self.note})" if self.note else ""
        return f"{self.cell}: {self.metric} limit {self.limit:g}, measured {self.measured:.4g}{extra}"


def _accuracy(metrics, when: str) -> float | None:
    m = metrics.get(when) or {}
    return m.get("accuracy", m.get("f1"))


def _label(labels: dict, cell_id: str) -> str:
    return " ".join(f"{k}={v}" for k, v in labels.items()) or cell_id


def _same_machine(a: CellRecord, b: CellRecord) -> bool:
    return all((a.env or {}).get(k) == (b.env or {}).get(k) for k in ("cpu", "gpu", "torch_threads"))


def measured_value(rec: CellRecord, derived: dict, limit: str, phases=None, forward_peak=None) -> float | None:
    """What ``limit`` holds in ``rec``. A peak is the whole cell's (every phase) unless the budget names its
    ``phases``; the ratio to inference is over the training phases unless it names others."""
    if limit == "peak_mib_max":
        return phase_peak(rec, phases)[0] if phases else derived.get("cell_peak_mib", derived.get("peak_mib"))
    if limit == "peak_over_inference_max" and phases:
        peak = phase_peak(rec, phases)[0]
        return peak / forward_peak if peak is not None and forward_peak else None
    if limit in RATIOS:
        return derived.get(RATIOS[limit])
    if not rec.accuracy_meaningful:
        return None
    if limit == "accuracy_min":
        return _accuracy(rec.metrics, "test_after")
    if limit == "accuracy_drop_max":
        before, after = _accuracy(rec.metrics, "test_before"), _accuracy(rec.metrics, "test_after")
        return None if before is None or after is None else before - after
    return None


def _broken(limit: str, value: float, measured: float) -> bool:
    return measured < value if limit == "accuracy_min" else measured > value


def check(records: list[CellRecord], suite: Suite, baseline: list[CellRecord] | None = None,
          estimates: list[Estimate] | None = None) -> tuple[list[Violation], list[str]]:
    """Return (violations, notes)."""
    violations, notes = [], []
    derived = derive(records)
    forwards = _forward_peaks(records, derived)
    base = {r.cell_id: r for r in latest_by_cell(baseline or []) if r.ok}
    heap_held = set()  # malloc: glibc cells held to a peak budget
    for rec in (r for r in latest_by_cell(records) if r.ok):
        cell, label = {**rec.config, **rec.labels}, _label(rec.labels, rec.cell_id)
        d = None
        for budget in (b for b in suite.budgets if selector_matches(b.match, cell)):
            for limit, value in budget.limits.items():
                if limit in PEAK_LIMITS and cell.get("malloc") == "glibc":
                    heap_held.add(rec.cell_id)
                if limit == "latency_tolerance":
                    violations += _latency(rec, base.get(rec.cell_id), value, label, notes)
                    continue
                d = d or derived[rec.cell_id].to_dict()
                measured = measured_value(rec, d, limit, budget.phases, forwards.get(rec.cell_id))
                if measured is not None and _broken(limit, value, measured):
                    note = ""
                    if limit == "peak_mib_max" and d.get("peak_kind"):
                        # Which peak the budget held (device: what the card holds; allocated; rss), and where.
                        where = phase_peak(rec, budget.phases)[1] if budget.phases else d.get("cell_peak_phase")
                        note = f"{d['peak_kind']} peak, in phase {where}"
                    violations.append(Violation(label, limit, value, measured, note))
    if heap_held:
        notes.append(f"{len(heap_held)} cell(s) with malloc: glibc are held to a peak budget: their peaks include "
                     "what the heap kept of freed blocks, ~10% from run to run; a peak budget is steadier on "
                     "malloc: release cells (live memory)")
    for est in estimates or []:
        cell = {**est.config, **est.labels}
        for budget in (b for b in suite.budgets if selector_matches(b.match, cell)):
            for limit, value in budget.limits.items():
                peak = est.peak(budget.phases)
                if limit in ESTIMATED_LIMITS and _broken(limit, value, peak):
                    where = max(est.phases, key=est.phases.get) if est.phases and not budget.phases else ""
                    violations.append(Violation(_label(est.labels, est.cell_id) + " [estimated]", limit, value,
                                                peak, f"in phase {where}" if where else ""))
    return violations, notes


def _forward_peaks(records: list[CellRecord], derived: dict) -> dict[str, float]:
    """Each cell's inference peak (its forward reference cell's training peak), from the derived ratio:
    peak / (peak / inference); for a budget that holds other phases against it."""
    out = {}
    for rec in latest_by_cell(records):
        d = derived[rec.cell_id]
        if d.peak_over_inference and d.peak_mib:
            out[rec.cell_id] = d.peak_mib / d.peak_over_inference
    return out


def _latency(rec: CellRecord, base: CellRecord | None, tolerance: float, label: str, notes: list) -> list:
    if base is None:
        return []
    if not _same_machine(rec, base):
        notes.append(f"{label}: baseline from another machine; latency not compared")
        return []
    now = rec.metrics.step_s.median if rec.metrics.step_s else None
    then = base.metrics.step_s.median if base.metrics.step_s else None
    if now and then and now > then * (1 + tolerance):
        return [Violation(label, "step_median_s vs baseline", then * (1 + tolerance), now,
                          f"baseline {then:.4g} s, tolerance {tolerance:g}")]
    return []
