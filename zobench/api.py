"""The small Python API.

    import zobench.api
    rec = zobench.api.train(model="smollm2", task="sst2", method="sensitive", density=1e-3, steps=50)
    rec.metrics.get("test_after")   # {"accuracy": ...}
    rec.to_json()                   # the record as written to results files
"""

from __future__ import annotations

from typing import Any

from zobench.cell.pipeline import Progress, run_cell
from zobench.cell.record import CellRecord
from zobench.spec.config import CellConfig
from zobench.spec.matrix import cell_id


def train(progress: Progress | None = None, **settings: Any) -> CellRecord:
    """Run one fine-tuning with the given settings (any ``CellConfig`` key) and return its record."""
    cfg = CellConfig.from_dict({k: v for k, v in settings.items() if v is not None}, where="train")
    rec = run_cell(cfg, progress)
    rec.cell_id = cell_id(cfg)
    return rec
