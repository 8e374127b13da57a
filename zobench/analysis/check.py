"""Budgets (and an optional same-machine baseline) -> violations. `zobench check` exits 1 on any.

Measured cells are checked through the ratios derived from the whole set of records (``derive``), so a
record's ratios never depend on which cells ran before it. Latency is only ever compared against a
baseline measured on the same machine (same CPU/GPU name and thread count).

A cell of the suite without an ok measurement (no record, or e.g. "unsupported: needs a CUDA device" on a
CPU machine) can be checked by its ``Estimate`` (``zobench.analysis.estimate``): that is how CI holds a 7B
budget without a GPU. Estimates are a separate input, never records, and are held to ``peak_mib_max``
only: the ratio budgets' margins (5-10%) are no wider than the estimator's accuracy, and accuracy and
latency are not predicted at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zobench.analysis.derive import derive, latest_by_cell
from zobench.cell.record import CellRecord
from zobench.errors import UserError
from zobench.spec.selectors import selector_matches
from zobench.spec.suite import Suite

ESTIMATED_LIMITS = ("peak_mib_max",)
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


def measured_value(rec: CellRecord, derived: dict, limit: str) -> float | None:
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
    base = {r.cell_id: r for r in latest_by_cell(baseline or []) if r.ok}
    for rec in (r for r in latest_by_cell(records) if r.ok):
        cell, label = {**rec.config, **rec.labels}, _label(rec.labels, rec.cell_id)
        for budget in (b for b in suite.budgets if selector_matches(b.match, cell)):
            for limit, value in budget.limits.items():
                if limit == "latency_tolerance":
                    violations += _latency(rec, base.get(rec.cell_id), value, label, notes)
                    continue
                d = derived[rec.cell_id].to_dict()
                measured = measured_value(rec, d, limit)
                if measured is not None and _broken(limit, value, measured):
                    # Which peak the budget held: device (what the card holds), allocated or rss.
                    note = f"{d['peak_kind']} peak" if limit == "peak_mib_max" and d.get("peak_kind") else ""
                    violations.append(Violation(label, limit, value, measured, note))
    for est in estimates or []:
        cell = {**est.config, **est.labels}
        for budget in (b for b in suite.budgets if selector_matches(b.match, cell)):
            for limit, value in budget.limits.items():
                if limit in ESTIMATED_LIMITS and _broken(limit, value, est.peak_mib):
                    violations.append(Violation(_label(est.labels, est.cell_id) + " [estimated]", limit, value,
                                                est.peak_mib))
    return violations, notes


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


def estimate_missing(suite: Suite, records: list[CellRecord]) -> tuple[list[Estimate], list[str]]:
    """Estimates for the suite's cells with no ok measurement, and one line per such cell.

    The line says the cell was estimated, why (no record, or its record's status) and, for a ZO cell,
    its estimate over its forward reference's estimate: shown for reading, not held to ratio budgets.
    """
    from zobench.analysis.estimate import estimate_cell
    from zobench.spec.matrix import expand, reference_key

    cells = expand(suite)
    latest = {r.cell_id: r for r in latest_by_cell(records)}
    cache: dict[str, dict | str] = {}

    def estimate(cell) -> dict | str:
        if cell.cell_id not in cache:
            try:
                cache[cell.cell_id] = estimate_cell(cell.config)
            except UserError as e:  # e.g. full ZO on 4-bit weights: the pipeline refuses it too
                cache[cell.cell_id] = str(e)
        return cache[cell.cell_id]

    forward = {reference_key(c.config.to_dict()): c for c in cells if c.config.method_class.family == "reference"}
    out, lines = [], []
    for cell in cells:
        rec = latest.get(cell.cell_id)
        if rec is not None and rec.ok:
            continue
        reason = (str(rec.reason or "").splitlines() or [""])[0][:80] if rec else ""
        why = "no measured record" if rec is None else f"record {rec.status}: {reason}".rstrip(": ")
        est = estimate(cell)
        if isinstance(est, str):
            lines.append(f"not estimated: {cell.describe()}: {est}")
            continue
        ratio = ""
        ref = forward.get(reference_key(cell.config.to_dict()))
        if ref is not None and ref.cell_id != cell.cell_id and isinstance(estimate(ref), dict):
            ratio = f", {est['peak_mib'] / estimate(ref)['peak_mib']:.3f}x its forward's estimate"
        out.append(Estimate(cell.cell_id, cell.labels, cell.config.to_dict(), est["device"], est["peak_mib"],
                            est["breakdown"], est.get("calibration", {})))
        lines.append(f"estimated: {cell.describe()}: peak {est['peak_mib']:.0f} MiB on {est['device']}{ratio} "
                     f"({why})")
    return out, lines
