"""What the markdown and the plots share: which cells, in what order, under what name, and reading values.

Records are plain dicts written by any version of the runner, so every read here tolerates a missing key
(a failed cell has no metrics) and returns None instead of raising.
"""

from __future__ import annotations

import math

from zobench.spec.catalog import METHODS, MethodInfo

PHASES = ("load", "mask", "quantize", "eval_before", "warmup", "train", "eval_after")  # the order they run in
KEY_AXES = ("method", "quant", "density")
EXTRA_ORDER = ("model", "task", "dtype")
TRAINING_ONLY = ("lr", "eps")  # settings a reference (forward-only) cell carries but never uses


def get(rec: dict, path: str):
    """``get(rec, "metrics.step_s.median")``: the nested value, or None where any step is missing."""
    cur = rec
    for key in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur


def setting(rec: dict, key: str):
    """A matrix label, else the resolved config value (a suite may fix an axis in its defaults)."""
    labels = rec.get("labels") or {}
    return labels[key] if key in labels else (rec.get("config") or {}).get(key)


def method(rec: dict) -> str:
    return str(setting(rec, "method") or "?")


def quant(rec: dict) -> str:
    return str(setting(rec, "quant") or "none")


def method_info(rec: dict) -> MethodInfo | None:
    """What the record's method declares (``spec.catalog``), or None for a name this zobench does not know."""
    return METHODS.get(method(rec)) if method(rec) in METHODS else None


def is_sparse(rec: dict) -> bool:
    return bool(getattr(method_info(rec), "needs_mask", False))


def is_zo(rec: dict) -> bool:
    return getattr(method_info(rec), "family", None) == "zo"


def method_order(name: str) -> tuple:
    """Reports list the reference first, then ZO methods, then first-order baselines (``MethodInfo.order``)."""
    return (METHODS.get(name).order, name) if name in METHODS else (1000, name)


def density(rec: dict):
    """The requested density, only where it means something (dense methods train everything or nothing)."""
    return setting(rec, "density") if is_sparse(rec) else None


def meaningful(rec: dict) -> bool:
    return rec.get("accuracy_meaningful") is not False


def is_cuda(rec: dict) -> bool:
    return str(rec.get("device") or setting(rec, "device") or "cpu").startswith("cuda")


def phase_peak(rec: dict, phase: str):
    """Peak MiB of a phase: on a GPU the device memory the driver reported where sampled, else CUDA max
    allocated; on a CPU peak RSS (as ``derived.peak_mib``)."""
    if not is_cuda(rec):
        return get(rec, f"phases.{phase}.peak_rss_mib")
    device = get(rec, f"phases.{phase}.device_peak_mib")
    return device if device is not None else get(rec, f"phases.{phase}.cuda_max_allocated_mib")


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


def sort_key(rec: dict) -> tuple:
    q = quant(rec)
    rest = sorted((k, _label_order(v)) for k, v in (rec.get("labels") or {}).items()
                  if k not in KEY_AXES + EXTRA_ORDER)
    return (str(setting(rec, "model")), str(setting(rec, "task")), str(setting(rec, "dtype")),
            (q != "none", q), method_order(method(rec)), _num_or_inf(density(rec)),
            rest, str(rec.get("cell_id")))


def axis_value(rec: dict, axis: str) -> str:
    """An axis's value as tables and legends show it: "-" for an lr (or eps) of a cell that trains nothing."""
    if axis in TRAINING_ONLY and getattr(method_info(rec), "family", None) == "reference":
        return "-"
    return str(setting(rec, axis))


def varying_axes(recs: list[dict]) -> list[str]:
    """Label axes besides method/quant/density whose value differs between cells: they become columns."""
    axes = {k for r in recs for k in (r.get("labels") or {}) if k not in KEY_AXES}
    axes |= {k for k in EXTRA_ORDER if len({str(setting(r, k)) for r in recs}) > 1}
    varying = [a for a in axes if len({axis_value(r, a) for r in recs} - {"-"}) > 1]
    return sorted(varying, key=lambda a: _order(a, EXTRA_ORDER))


def pct(value, digits: int = 3) -> str:
    """A fraction as a percent with a few significant digits: 0.001 -> 0.1%, 1.0 -> 100%."""
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value * 100:.{digits}g}%"


def short_name(rec: dict, extras: list[str]) -> str:
    """``sensitive/nf4/0.1%`` (plus any varying axes): a cell's name in plot legends and tick labels."""
    parts = [method(rec), quant(rec)]
    if density(rec) is not None:
        parts.append(pct(density(rec)))
    parts += [axis_value(rec, a) for a in extras]
    return "/".join(parts)
