"""Suite -> cells. A cell is a resolved CellConfig plus its matrix labels; its id hashes the config.

For every (model, dtype, quant, task) in the suite a ``forward`` reference cell is added: inference only
on the same batches, the physical floor ZO is measured against. Cells run in a fixed order: forward
references first, then full ZO, then the rest, so ratios against them can be computed as records land.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass

from zobench.config import CellConfig
from zobench.suite import Suite, selector_matches

ORDER = {"forward": 0, "full": 1}
REFERENCE_KEYS = ("model", "dtype", "quant", "task", "batch_size", "max_length", "device", "seed")
# Settings that do not change what a non-sparse method runs: dropped from its identity so that the
# density axis does not duplicate full-ZO or forward cells.
SPARSE_ONLY = ("density", "per_tensor", "calib_path", "calib_sequences", "calib_length")


@dataclass
class Cell:
    cell_id: str
    config: CellConfig
    labels: dict

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.labels.items())


def cell_id(cfg: CellConfig) -> str:
    d = cfg.to_dict()
    d.pop("timeout_s")  # a limit, not part of what the cell measures
    if not cfg.is_sparse:
        for k in SPARSE_ONLY:
            d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _make(suite: Suite, values: dict, where: str) -> CellConfig:
    merged = dict(suite.defaults, **values)
    for sel, sets in suite.overrides:
        if selector_matches(sel, merged):
            merged.update(sets)
    return CellConfig.from_dict(merged, where)


def expand(suite: Suite) -> list[Cell]:
    where = str(suite.path or suite.name)
    axes = list(suite.matrix)
    cells: dict[str, Cell] = {}
    for combo in itertools.product(*(suite.matrix[a] for a in axes)):
        values = dict(zip(axes, combo))
        label_where = f"{where}: cell " + ", ".join(f"{k}={v}" for k, v in values.items())
        cfg = _make(suite, values, label_where)
        labels = {a: getattr(cfg, a) for a in axes if cfg.is_sparse or a not in SPARSE_ONLY}
        labels.setdefault("method", cfg.method)
        cid = cell_id(cfg)
        cells.setdefault(cid, Cell(cid, cfg, labels))
    if suite.reference:
        for cell in list(cells.values()):
            ref = {k: getattr(cell.config, k) for k in REFERENCE_KEYS}
            cfg = _make(suite, dict(ref, method="forward", eval_before=False, eval_after=False,
                                    eval_every=0), f"{where}: forward reference")
            labels = {k: v for k, v in cell.labels.items() if k not in SPARSE_ONLY}
            labels["method"] = "forward"
            cid = cell_id(cfg)
            cells.setdefault(cid, Cell(cid, cfg, labels))
    return sorted(cells.values(), key=lambda c: ORDER.get(c.config.method, 2))


def reference_key(cfg: dict) -> tuple:
    """Cells sharing this key are compared against the same forward (and full-ZO) cell."""
    return tuple(cfg.get(k) for k in REFERENCE_KEYS)
