"""The small Python API.

    import zobench.api
    rec = zobench.api.train(model="smollm2", task="sst2", method="sensitive", density=1e-3, steps=50)
    rec.metrics.get("test_after")   # {"accuracy": ...}
    rec.to_json()                   # the record as written to results files
"""

from __future__ import annotations

from typing import Any

from zobench.analysis.fits import host_need_mib, memory_refusal
from zobench.cell.pipeline import Progress, run_cell
from zobench.cell.record import CellRecord
from zobench.errors import UserError
from zobench.measure import machine
from zobench.procs import RELEASE_ENV, malloc_in_effect
from zobench.spec.config import CellConfig
from zobench.spec.matrix import cell_id


def train(progress: Progress | None = None, memory_check: bool = False, **settings: Any) -> CellRecord:
    """Run one fine-tuning with the given settings (any ``CellConfig`` key) and return its record.

    It runs in this process, whose allocator was fixed when it started: the record's ``malloc`` says which
    (``procs.malloc_in_effect``), and asking for the other one is refused rather than recorded falsely.
    ``memory_check`` (the command line's default): refuse a run whose estimated peak is more than the memory
    available now, as ``zobench run`` does a cell (``analysis.fits``)."""
    actual, asked = malloc_in_effect(), settings.get("malloc")
    if asked is not None and asked != actual:
        release = " ".join(f"{k}={v}" for k, v in RELEASE_ENV.items())
        hint = f"with {release}" if asked == "release" else f"without {', '.join(RELEASE_ENV)}"
        raise UserError(f"train: malloc={asked}: this run is in this process, which started under {actual}; "
                        f"start it {hint}, or run it as a suite cell (its own process)")
    settings = {**settings, "malloc": actual}
    cfg = CellConfig.from_dict({k: v for k, v in settings.items() if v is not None}, where="train")
    if memory_check and (why := memory_refusal(host_need_mib(cfg), machine.available_memory_mib(),
                                               "--no-memory-check")):
        raise UserError(f"train: {why}")
    rec = run_cell(cfg, progress)
    rec.cell_id = cell_id(cfg)
    return rec
