"""The small Python API.

    import zobench
    record = zobench.api.train(model="smollm2", task="sst2", method="sensitive", density=1e-3, steps=50)
    record["metrics"]["test_after"]   # {"accuracy": ...}
"""

from __future__ import annotations

from typing import Any

from zobench.config import CellConfig
from zobench.runner import Progress, run_cell


def train(progress: Progress | None = None, **settings: Any) -> dict:
    """Run one fine-tuning with the given settings (any ``CellConfig`` key) and return its record."""
    cfg = CellConfig.from_dict({k: v for k, v in settings.items() if v is not None}, where="train")
    return run_cell(cfg, progress)
