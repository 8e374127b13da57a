"""Budgets (and an optional same-machine baseline) -> violations. `zobench check` exits 1 on any.

Latency is only ever compared against a baseline measured on the same machine (same CPU/GPU name and
thread count): absolute times from another machine say nothing.

A cell of the suite without an ok measurement (no record, or e.g. "unsupported: needs a CUDA device" on a
CPU machine) is checked by its estimate (``zobench.estimate``): that is how CI holds a 7B budget without
a GPU. Estimates are held to ``peak_mib_max`` only: the ratio budgets' margins (5-10%) are no wider than
the estimator's accuracy (within 10% of measured peaks), so a ratio of two estimates cannot tell a
broken ratio budget from estimation error; accuracy and latency are not predicted at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from zobench.errors import UserError
from zobench.results import latest_by_cell
from zobench.suite import Suite, selector_matches

ESTIMATED_LIMITS = ("peak_mib_max",)


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


def _accuracy(metrics: dict, when: str) -> float | None:
    m = metrics.get(when) or {}
    return m.get("accuracy", m.get("f1"))


def _label(rec: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in rec.get("labels", {}).items()) or rec["cell_id"]


def _same_machine(a: dict, b: dict) -> bool:
    keys = ("cpu", "gpu", "torch_threads")
    return all((a.get("env") or {}).get(k) == (b.get("env") or {}).get(k) for k in keys)


def measured_value(rec: dict, limit: str) -> float | None:
    d, m = rec.get("derived") or {}, rec.get("metrics") or {}
    if limit == "peak_mib_max":
        return d.get("peak_mib")
    if limit == "peak_over_inference_max":
        return d.get("peak_over_inference")
    if limit == "step_over_two_forwards_max":
        return d.get("step_over_two_forwards")
    if not rec.get("accuracy_meaningful", True):
        return None
    if limit == "accuracy_min":
        return _accuracy(m, "test_after")
    if limit == "accuracy_drop_max":
        before, after = _accuracy(m, "test_before"), _accuracy(m, "test_after")
        return None if before is None or after is None else before - after
    return None


def check(records: list[dict], suite: Suite, baseline: list[dict] | None = None,
          estimates: dict[str, dict] | None = None) -> tuple[list[Violation], list[str]]:
    """Return (violations, notes). ``estimates`` maps cell ids without a measurement to predicted records."""
    violations, notes = [], []
    recs = [r for r in latest_by_cell(records) if r.get("status") == "ok"]
    recs += list((estimates or {}).values())
    base = {r["cell_id"]: r for r in latest_by_cell(baseline or []) if r.get("status") == "ok"}
    for rec in recs:
        cell = {**rec.get("config", {}), **rec.get("labels", {})}
        tag = " [estimated]" if rec.get("estimated") else ""
        for budget in suite.budgets:
            if not selector_matches(budget.match, cell):
                continue
            for limit, value in budget.limits.items():
                if rec.get("estimated") and limit not in ESTIMATED_LIMITS:
                    continue
                if limit == "latency_tolerance":
                    b = base.get(rec["cell_id"])
                    if b is None or rec.get("estimated"):
                        continue
                    if not _same_machine(rec, b):
                        notes.append(f"{_label(rec)}: baseline from another machine; latency not compared")
                        continue
                    now = (rec.get("metrics", {}).get("step_s") or {}).get("median")
                    then = (b.get("metrics", {}).get("step_s") or {}).get("median")
                    if now and then and now > then * (1 + value):
                        violations.append(Violation(_label(rec), "step_median_s vs baseline", then * (1 + value),
                                                    now, f"baseline {then:.4g} s, tolerance {value:g}"))
                    continue
                measured = measured_value(rec, limit)
                if measured is None:
                    continue
                broken = measured < value if limit == "accuracy_min" else measured > value
                if broken:
                    violations.append(Violation(_label(rec) + tag, limit, value, measured))
    return violations, notes


def estimate_missing(suite: Suite, records: list[dict]) -> tuple[dict[str, dict], list[str]]:
    """Predicted records for the suite's cells with no ok measurement, and one line per such cell.

    The line says the cell was estimated, why (no record, or its record's status) and, for a ZO cell,
    its estimate over its forward reference's estimate: shown for reading, not held to ratio budgets.
    """
    from zobench.estimate import estimate_cell
    from zobench.matrix import expand, reference_key

    cells = expand(suite)
    latest = {r.get("cell_id"): r for r in latest_by_cell(records)}
    cache: dict[str, dict | str] = {}

    def estimate(cell) -> dict | str:
        if cell.cell_id not in cache:
            try:
                cache[cell.cell_id] = estimate_cell(cell.config)
            except UserError as e:  # e.g. full ZO on 4-bit weights: the runner refuses it too
                cache[cell.cell_id] = str(e)
        return cache[cell.cell_id]

    forward = {reference_key(c.config.to_dict()): c for c in cells if c.config.method == "forward"}
    out, lines = {}, []
    for cell in cells:
        rec = latest.get(cell.cell_id)
        if rec is not None and rec.get("status") == "ok":
            continue
        reason = (str(rec.get("reason") or "").splitlines() or [""])[0][:80] if rec else ""
        why = "no measured record" if rec is None else f"record {rec.get('status')}: {reason}".rstrip(": ")
        est = estimate(cell)
        if isinstance(est, str):
            lines.append(f"not estimated: {cell.describe()}: {est}")
            continue
        ratio = ""
        ref = forward.get(reference_key(cell.config.to_dict()))
        if ref is not None and ref.cell_id != cell.cell_id and isinstance(estimate(ref), dict):
            ratio = f", {est['peak_mib'] / estimate(ref)['peak_mib']:.3f}x its forward's estimate"
        out[cell.cell_id] = {
            "cell_id": cell.cell_id, "labels": cell.labels, "config": cell.config.to_dict(), "status": "ok",
            "estimated": True, "device": est["device"], "metrics": {}, "derived": {"peak_mib": est["peak_mib"]},
            "estimate": {"peak_mib": est["peak_mib"], "breakdown": est["breakdown"]}}
        lines.append(f"estimated: {cell.describe()}: peak {est['peak_mib']:.0f} MiB on {est['device']}{ratio} "
                     f"({why})")
    return out, lines
