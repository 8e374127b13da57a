"""Suites: a YAML file of defaults, matrix axes, per-cell overrides and budgets, validated up front.

    name: smollm2
    defaults: {model: smollm2, task: sst2, steps: 20}
    matrix: {method: [full, random, sensitive], density: [1.0e-3]}
    exclude:                     # optional: combinations of the matrix not to run
      - {method: full, density: 1.0e-3}
    overrides:
      - match: {method: full}
        set: {lr: 1.0e-7}
    budgets:
      - match: {method: sensitive}
        peak_mib_max: 900
    lr_pilot:                    # optional: choose each cell's lr on dev with short runs first
      steps: 200
      grids:
        - match: {method: [random, sensitive]}
          lr: [3.0e-5, 1.0e-4, 3.0e-4]
      set: {pack: false}         # optional: settings of the pilot cells beside their cells' own
      by: last                   # optional: choose by the pilot's last dev score (default: its best)
    claims: ...                  # optional: what the suite sets out to show (zobench.spec.claims)
    timeout_s: 1800

Every error names the file and the key, e.g. ``suites/x.yaml: matrix.methd: unknown key ...``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zobench.errors import UserError, shown
from zobench.spec.catalog import CELL_PHASES
from zobench.spec.claims import Claim, parse_claims
from zobench.spec.config import CellConfig, refuse_file_keys
from zobench.spec.matrix import expand
from zobench.spec.selectors import parse_selector, unknown_key
from zobench.spec.yaml_text import load_yaml

SUITE_KEYS = ("name", "description", "defaults", "matrix", "exclude", "overrides", "budgets", "timeout_s",
              "reference", "lr_pilot", "claims")
BUDGET_LIMITS = {
    "peak_mib_max": "the whole cell's peak at most this (MiB): every phase, or the budget's `phases`",
    "peak_over_inference_max": "ZO peak / inference peak at most this",
    "step_over_two_forwards_max": "step median / two forward medians at most this",
    "accuracy_min": "test accuracy after training at least this (fraction)",
    "accuracy_drop_max": "test accuracy before - after at most this",
    "latency_tolerance": "step median at most (1 + this) x the baseline's (same machine only)",
}
# The values a limit can hold: a peak or a ratio above 0, accuracies as fractions (85% is 0.85), a tolerance
# of 0 or more. Outside them a budget could never hold, or never break: a typo, refused.
BUDGET_RANGES = {
    "peak_mib_max": (lambda v: v > 0, "a number above 0"),
    "peak_over_inference_max": (lambda v: v > 0, "a number above 0"),
    "step_over_two_forwards_max": (lambda v: v > 0, "a number above 0"),
    "accuracy_min": (lambda v: 0 <= v <= 1, "a fraction in [0, 1] (0.85 for 85%)"),
    "accuracy_drop_max": (lambda v: -1 <= v <= 1, "a fraction in [-1, 1] (0.02 for 2 points)"),
    "latency_tolerance": (lambda v: v >= 0, "a number >= 0 (0.1 for 10%)"),
}


@dataclass
class Budget:
    match: dict[str, list]
    limits: dict[str, float]
    where: str
    # The phases a peak limit holds: None = peak_mib_max over the whole cell (every phase it measured),
    # peak_over_inference_max over the training phases (warm-up and train), as inference is measured there.
    phases: tuple[str, ...] | None = None


PILOT_OWNS = ("lr", "steps", "eval_every", "seed", "warmup_steps", "eval_before", "eval_after")


@dataclass
class LrPilot:
    """Short runs that choose each cell's learning rate on dev before the cell runs (``zobench.spec.pilot``)."""

    steps: int
    eval_every: int
    grids: list[tuple[dict[str, list], list[float]]]  # (selector, learning rates)
    settings: dict[str, Any] = field(default_factory=dict)  # ``set:``: the pilots' config beside their cells'
    by: str = "best"   # the dev score an lr is chosen by: the pilot's best evaluation, or its last


@dataclass
class Suite:
    name: str
    path: Path | None
    defaults: dict[str, Any]
    matrix: dict[str, list]
    overrides: list[tuple[dict[str, list], dict[str, Any]]] = field(default_factory=list)
    budgets: list[Budget] = field(default_factory=list)
    timeout_s: float = 3600.0
    reference: bool = True
    description: str = ""
    lr_pilot: LrPilot | None = None
    exclude: list[dict[str, list]] = field(default_factory=list)  # matrix combinations that are not run
    claims: list[Claim] = field(default_factory=list)  # declared before the run (zobench.spec.claims)


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping")
    return value


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    data = load_yaml(path)
    if isinstance(data, dict) and data.get("type") == "influence":
        raise UserError(f"{path}: an influence suite: it has no cells or budgets; run it with `zobench run`")
    return parse_suite(data, str(path), path)


def _number_list(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") for v in value):
        raise UserError(f"{where}: expected a non-empty list of positive numbers")
    return [float(v) for v in value]


def _list(value: Any, where: str) -> list:
    """A section that is a list of entries (absent or null: none), else one line saying so (a number there
    was a TypeError, a string was read letter by letter)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}: expected a list of entries (- ...), got {shown(value)}")
    return value


def _overrides(data: dict, where: str) -> list:
    overrides = []
    for i, item in enumerate(_list(data.get("overrides"), f"{where}: key 'overrides'")):
        w = f"{where}: overrides[{i}]"
        item = _mapping(item, w)
        for k in item:
            if k not in ("match", "set"):
                raise unknown_key(w, k, ("match", "set"))
        sets = _mapping(item.get("set"), f"{w}.set")
        for k in sets:
            if k not in CellConfig.keys():
                raise unknown_key(f"{w}.set", k, CellConfig.keys())
        refuse_file_keys(sets, f"{w}.set")
        overrides.append((parse_selector(item.get("match", {}), f"{w}.match"), sets))
    return overrides


def _budgets(data: dict, where: str) -> list[Budget]:
    budgets = []
    for i, item in enumerate(_list(data.get("budgets"), f"{where}: key 'budgets'")):
        w = f"{where}: budgets[{i}]"
        item = _mapping(item, w)
        limits, phases = {}, None
        for k, v in item.items():
            if k == "match":
                continue
            if k == "phases":
                if not isinstance(v, list) or not v or any(p not in CELL_PHASES for p in v):
                    raise UserError(f"{w}.phases: expected a list of phases from {', '.join(CELL_PHASES)}")
                phases = tuple(v)
                continue
            if k not in BUDGET_LIMITS:
                raise unknown_key(w, k, ["match", "phases", *BUDGET_LIMITS])
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or abs(v) == float("inf"):
                raise UserError(f"{w}.{k}: expected a finite number ({BUDGET_LIMITS[k]})")
            holds, what = BUDGET_RANGES[k]
            if not holds(v):
                raise UserError(f"{w}.{k} = {v:g}: expected {what} ({BUDGET_LIMITS[k]})")
            limits[k] = float(v)
        if not limits:
            raise UserError(f"{w}: no limit given (one of: {', '.join(BUDGET_LIMITS)})")
        if phases is not None and not {"peak_mib_max", "peak_over_inference_max"} & set(limits):
            raise UserError(f"{w}.phases: only a peak limit (peak_mib_max, peak_over_inference_max) holds phases")
        budgets.append(Budget(parse_selector(item.get("match", {}), f"{w}.match"), limits, w, phases))
    return budgets


def _lr_pilot(data: dict, where: str) -> LrPilot | None:
    if data.get("lr_pilot") is None:
        return None
    w = f"{where}: lr_pilot"
    item = _mapping(data["lr_pilot"], w)
    for k in item:
        if k not in ("steps", "eval_every", "grids", "set", "by"):
            raise unknown_key(w, k, ("steps", "eval_every", "grids", "set", "by"))
    steps = item.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"{w}.steps: expected a number of steps >= 1")
    every = item.get("eval_every", steps)
    if not isinstance(every, int) or isinstance(every, bool) or not 1 <= every <= steps:
        raise UserError(f"{w}.eval_every: expected a number of steps between 1 and steps ({steps})")
    grids = []
    for i, g in enumerate(_list(item.get("grids"), f"{w}.grids")):
        gw = f"{w}.grids[{i}]"
        g = _mapping(g, gw)
        for k in g:
            if k not in ("match", "lr"):
                raise unknown_key(gw, k, ("match", "lr"))
        grids.append((parse_selector(g.get("match", {}), f"{gw}.match"), _number_list(g.get("lr"), f"{gw}.lr")))
    if not grids:
        raise UserError(f"{w}.grids: expected at least one {{match, lr: [...]}} grid")
    sets = _mapping(item.get("set"), f"{w}.set")
    refuse_file_keys(sets, f"{w}.set")
    for k in sets:
        if k in PILOT_OWNS:
            raise UserError(f"{w}.set.{k}: the pilot sets {k} itself (steps and eval_every above, lr from the grids)")
        if k not in CellConfig.keys():
            raise unknown_key(f"{w}.set", k, CellConfig.keys())
    checked = CellConfig.from_dict(dict(sets), f"{w}.set")  # the values' types, as a cell's config checks them
    by = item.get("by", "best")
    if by not in ("best", "last"):
        raise UserError(f"{w}.by: expected best or last (the pilot's dev score an lr is chosen by)")
    return LrPilot(steps, every, grids, {k: getattr(checked, k) for k in sets}, by)


def parse_suite(data: Any, where: str, path: Path | None = None) -> Suite:
    data = _mapping(data, where)
    for k in data:
        if k not in SUITE_KEYS:
            raise unknown_key(where, k, SUITE_KEYS)
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name or not name.isprintable() or len(name) > 200 or \
            name.startswith("."):
        raise UserError(f"{where}: key 'name': expected a printable name without '/' (it names the results file)")
    defaults = _mapping(data.get("defaults"), f"{where}: defaults")
    CellConfig.from_file(defaults, f"{where}: defaults")  # type-check the defaults alone
    matrix = _mapping(data.get("matrix"), f"{where}: matrix")
    refuse_file_keys(matrix, f"{where}: matrix")
    for k, v in matrix.items():
        if k not in CellConfig.keys():
            raise unknown_key(f"{where}: matrix", k, CellConfig.keys())
        if not isinstance(v, list) or not v:
            raise UserError(f"{where}: matrix.{k}: expected a non-empty list of values")
    timeout = data.get("timeout_s", 3600)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < float("inf"):
        raise UserError(f"{where}: key 'timeout_s': expected a positive number of seconds")
    reference = data.get("reference", True)
    if not isinstance(reference, bool):
        raise UserError(f"{where}: key 'reference': expected true or false")
    exclude = [parse_selector(sel, f"{where}: exclude[{i}]")
               for i, sel in enumerate(_list(data.get("exclude"), f"{where}: key 'exclude'"))]
    claims = parse_claims(data["claims"], where) if data.get("claims") is not None else []
    suite = Suite(name, path, defaults, matrix, _overrides(data, where), _budgets(data, where), float(timeout),
                  reference, str(data.get("description", "")), _lr_pilot(data, where), exclude, claims)
    expand(suite)  # validates every cell, so a bad combination fails here, before anything runs
    return suite


def suite_file_places(named: str, results_dir: Path | None) -> list[str]:
    """Where the suite file a record names (as ``zobench run`` was given it) may be now: from here, then from
    the folder above the results file's (where ``zobench run`` ran, with its default ``--out results``); those
    that exist."""
    tries = [Path(named)]
    if results_dir is not None and not Path(named).is_absolute():
        tries.append(Path(os.path.abspath(results_dir)).parent / named)
    return [p for p in dict.fromkeys(os.path.normpath(p) for p in tries) if os.path.exists(p)]
