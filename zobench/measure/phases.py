"""``with phases("train"): ...`` records the block's wall time and peak memory (reset at its start)."""

from __future__ import annotations

import contextlib
import time

from zobench.measure.memory import PeakMemory


class Phases:
    def __init__(self, device: str, into: dict):
        self.device, self.data = device, into

    @contextlib.contextmanager
    def __call__(self, name: str):
        from zobench.cell.record import PhaseMeasure

        start = time.perf_counter()
        with PeakMemory(self.device) as mem:
            yield
        self.data[name] = PhaseMeasure(wall_s=time.perf_counter() - start, **mem.result)
