"""What the markdown and the plots share: which cells, in what order, under what name, and reading values.

The report reads each cell as a ``CellView``: its latest record, typed (``zobench.cell.record``), with the
ratios derived from the whole set (``zobench.results.Derived``). Records come from any version of the
runner, so a value a record lacks (a failed cell has no metrics) reads as None, never as an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from zobench.cell.measures import Stats
from zobench.cell.record import CellRecord
from zobench.results import Derived
from zobench.spec.catalog import METHODS, MethodInfo

PHASES = ("load", "mask", "quantize", "eval_before", "warmup", "train", "eval_dev", "eval_after")  # as they run
# (eval_dev: the dev evaluations made during training, measured apart from it)
KEY_AXES = ("method", "quant", "density")
EXTRA_ORDER = ("model", "task", "dtype")
TRAINING_ONLY = ("lr", "eps")  # settings a reference (forward-only) cell carries but never uses


@dataclass
class CellView(CellRecord):
    """A cell's latest record as the report reads it, with ``derived``: its ratios against the other cells
    (read, never written into a record)."""

    derived: Derived = field(default_factory=Derived)

    @classmethod
    def of(cls, record: CellRecord, derived: Derived) -> "CellView":
        return cls(**{f.name: getattr(record, f.name) for f in fields(CellRecord)}, derived=derived)


def median(stats: Stats | None):
    """The median of repeated timings, None where none were timed."""
    return stats.median if stats is not None else None


def setting(rec: CellRecord, key: str):
    """A matrix label, else the resolved config value (a suite may fix an axis in its defaults)."""
    return rec.labels[key] if key in rec.labels else rec.config.get(key)


def method(rec: CellRecord) -> str:
    return str(setting(rec, "method") or "?")


def quant(rec: CellRecord) -> str:
    return str(setting(rec, "quant") or "none")


def declared(name: str) -> MethodInfo | None:
    """What a method declares (``spec.catalog``), or None for a name this zobench does not know."""
    return METHODS.get(name) if name in METHODS else None


def method_info(rec: CellRecord) -> MethodInfo | None:
    return declared(method(rec))


def is_sparse(rec: CellRecord) -> bool:
    return bool(getattr(method_info(rec), "needs_mask", False))


def is_zo(rec: CellRecord) -> bool:
    return getattr(method_info(rec), "family", None) == "zo"


def method_order(name: str) -> tuple:
    """Reports list the reference first, then ZO methods, then first-order baselines (``MethodInfo.order``)."""
    return (METHODS.get(name).order, name) if name in METHODS else (1000, name)


def density(rec: CellRecord):
    """The requested density, only where it means something (dense methods train everything or nothing)."""
    return setting(rec, "density") if is_sparse(rec) else None


def meaningful(rec: CellRecord) -> bool:
    return rec.accuracy_meaningful is not False


def is_cuda(rec: CellRecord) -> bool:
    return str(rec.device or setting(rec, "device") or "cpu").startswith("cuda")


def phase_peak(rec: CellRecord, phase: str):
    """Peak MiB of a phase: on a GPU the device memory the driver reported where sampled, else CUDA max
    allocated; on a CPU peak RSS (as ``derived.peak_mib``)."""
    measure = rec.phase(phase)
    if not is_cuda(rec):
        return measure.peak_rss_mib
    device = measure.device_peak_mib
    return device if device is not None else measure.cuda_max_allocated_mib


def primary_score(scores: dict | None):
    """One number per evaluation for plots: accuracy, else F1 (generative tasks report EM and F1)."""
    if not scores:
        return None
    return scores.get("accuracy", scores.get("f1"))


def _order(value, order: tuple) -> tuple:
    return (order.index(value), "") if value in order else (len(order), str(value))


def _num_or_inf(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.inf


def _label_order(value) -> tuple:
    """Numbers by value (lr 3e-07 before 1e-06), before any text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0, float(value), ""
    return 1, 0.0, str(value)


def sort_key(rec: CellRecord) -> tuple:
    q = quant(rec)
    rest = sorted((k, _label_order(v)) for k, v in rec.labels.items() if k not in KEY_AXES + EXTRA_ORDER)
    return (str(setting(rec, "model")), str(setting(rec, "task")), str(setting(rec, "dtype")),
            (q != "none", q), method_order(method(rec)), _num_or_inf(density(rec)),
            rest, str(rec.cell_id))


def axis_value(rec: CellRecord, axis: str) -> str:
    """An axis's value as tables and legends show it: "-" for an lr (or eps) of a cell that trains nothing."""
    if axis in TRAINING_ONLY and getattr(method_info(rec), "family", None) == "reference":
        return "-"
    return str(setting(rec, axis))


def varying_axes(recs: list[CellRecord]) -> list[str]:
    """Label axes besides method/quant/density whose value differs between cells: they become columns."""
    axes = {k for r in recs for k in r.labels if k not in KEY_AXES}
    axes |= {k for k in EXTRA_ORDER if len({str(setting(r, k)) for r in recs}) > 1}
    varying = [a for a in axes if len({axis_value(r, a) for r in recs} - {"-"}) > 1]
    return sorted(varying, key=lambda a: _order(a, EXTRA_ORDER))


def pct(value, digits: int = 3) -> str:
    """A fraction as a percent with a few significant digits: 0.001 -> 0.1%, 1.0 -> 100%."""
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value * 100:.{digits}g}%"


def short_name(rec: CellRecord, extras: list[str]) -> str:
    """``sensitive/nf4/0.1%`` (plus any varying axes): a cell's name in plot legends and tick labels."""
    parts = [method(rec), quant(rec)]
    if density(rec) is not None:
        parts.append(pct(density(rec)))
    parts += [axis_value(rec, a) for a in extras]
    return "/".join(parts)


def configs(cells: list[CellView], extras: list[str]) -> dict[str, list[CellView]]:
    """The cells grouped by their name without the seed (``short_name``), in the order first met: a suite's
    seeds are one configuration in a plot and in the report's "Over seeds" table, drawn once with their
    spread (a bar or a point a run is unreadable at 60 runs)."""
    names = [a for a in extras if a != "seed"]
    groups: dict[str, list[CellView]] = {}
    for r in cells:
        groups.setdefault(short_name(r, names), []).append(r)
    return groups
