"""Suite -> cells. A cell is a resolved CellConfig plus its matrix labels; its id hashes the config.

For every (model, dtype, quant, task, ...) in the suite a ``forward`` reference cell is added: inference
only on the same batches, the physical floor ZO is measured against. Cells are listed references first,
then in matrix order: a run that stops early has its references. Ratios against the
references are derived when records are read (``zobench.results.derive``), so nothing depends on the
order in which cells actually run or finish.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass

from zobench.errors import UserError
from zobench.spec.catalog import method_settings
from zobench.spec.config import CellConfig
from zobench.spec.selectors import parse_selector, selector_matches

REFERENCE = "forward"
MAX_CELLS = 10_000  # far beyond a real suite (the claims suite has 57 cells); a hostile matrix is refused
REFERENCE_KEYS = ("model", "dtype", "quant", "task", "batch_size", "max_length", "device", "seed", "malloc", "pack",
                  "shared_prompt", "n_train", "dev_from", "data_dir")
# Settings added after results were first kept across sessions, with the value every cell had before the
# setting existed: left out of a cell's identity while at that value, so that adding one does not change the
# id (the --resume key) of the cells it does not change. A new setting goes here. ``generator``: cells run
# before it existed drew z with torch's generator; a philox cell is another computation (other z, other
# timings), so it gets an id of its own and a --resume runs it instead of reusing a torch-generator result.
SINCE_IDS_ARE_KEPT = {"delta": None, "pack": False, "generator": "torch", "dev_from": "train", "lora_r": 8,
                      "lora_alpha": 16, "lora_targets": "q_proj,v_proj", "shape_warmup": "auto",
                      "malloc": "release"}


@dataclass
class Cell:
    cell_id: str
    config: CellConfig
    labels: dict

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.labels.items())


def identity(cfg: CellConfig) -> dict:
    """What a cell measures: its config without the limits and the settings of other methods (so that a
    density axis does not duplicate full-ZO or forward cells)."""
    d = cfg.to_dict()
    d.pop("timeout_s")  # a limit, not part of what the cell measures
    d.pop("save")       # where the result is kept, not what is measured
    d.pop("checkpoint")  # where progress is kept, likewise
    d.pop("overwrite")   # whether an old result there may be replaced, likewise
    d.pop("predictions")  # where per-example predictions go, likewise
    for key, before in SINCE_IDS_ARE_KEPT.items():  # a setting added later counts only when it changes the cell
        if d.get(key) == before:
            d.pop(key)
    for key in method_settings() - set(cfg.method_info.settings):
        d.pop(key, None)
    return d


def cell_id(cfg: CellConfig) -> str:
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _make(suite, values: dict, where: str) -> CellConfig:
    merged = dict(suite.defaults, **values)
    for sel, sets in suite.overrides:
        if selector_matches(sel, merged):
            merged.update(sets)
    return CellConfig.from_dict(merged, where)


def _labels(cfg: CellConfig, axes: list[str]) -> dict:
    foreign = method_settings() - set(cfg.method_info.settings)
    labels = {a: getattr(cfg, a) for a in axes if a not in foreign}
    labels.setdefault("method", cfg.method)
    return labels


def expand(suite) -> list[Cell]:
    """Every cell of ``suite`` (a ``spec.suite.Suite``), validated, with its forward references."""
    where = str(suite.path or suite.name)
    axes = list(suite.matrix)
    combos = math.prod(len(suite.matrix[a]) for a in axes)
    if combos > MAX_CELLS:
        raise UserError(f"{where}: matrix: {combos:,} combinations, more than a suite may expand "
                        f"({MAX_CELLS:,}); split it into several suites")
    cells: dict[str, Cell] = {}
    for combo in itertools.product(*(suite.matrix[a] for a in axes)):
        values = dict(zip(axes, combo))
        if any(selector_matches(sel, dict(suite.defaults, **values)) for sel in suite.exclude):
            continue
        cfg = _make(suite, values, f"{where}: cell " + ", ".join(f"{k}={v}" for k, v in values.items()))
        cid = cell_id(cfg)
        cells.setdefault(cid, Cell(cid, cfg, _labels(cfg, axes)))
    if suite.reference:
        for cell in list(cells.values()):
            ref = {k: getattr(cell.config, k) for k in REFERENCE_KEYS}
            cfg = _make(suite, dict(ref, method=REFERENCE, eval_before=False, eval_after=False, eval_every=0),
                        f"{where}: forward reference")
            labels = {k: v for k, v in cell.labels.items() if k in _labels(cfg, axes)}
            labels["method"] = REFERENCE
            cid = cell_id(cfg)
            cells.setdefault(cid, Cell(cid, cfg, labels))
    # References first (a run stopped early has them); the rest in matrix order.
    return sorted(cells.values(), key=lambda c: c.config.method_info.family != "reference")


def select(cells: list[Cell], only) -> list[Cell]:
    """The cells an ``--only`` selector (already parsed) keeps."""
    return [c for c in cells if selector_matches(only, {**c.config.to_dict(), **c.labels})]


def select_cells(suite, only: str | None = None) -> list[Cell]:
    """The suite's cells, or those the ``--only`` selector text keeps (none kept is refused)."""
    cells = expand(suite)
    if not only:
        return cells
    chosen = select(cells, parse_selector(only, "--only"))
    if not chosen:  # a typo in a value would otherwise run nothing and say "ok"
        raise UserError(f"--only {only}: selects none of the suite's {len(cells)} cells")
    return chosen


def reference_key(cfg: dict) -> tuple:
    """Cells sharing this key are compared against the same forward (and full-ZO) cell."""
    return tuple(key_part(cfg.get(k, SINCE_IDS_ARE_KEPT.get(k))) for k in REFERENCE_KEYS)


def key_part(value):
    """A setting as part of a key: itself where it is a plain value, else (a record is data: a list or a mapping
    where a setting belongs) its canonical JSON, which pairs only with the same value and never fails to hash."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return "json:" + json.dumps(value, sort_keys=True, default=str)
