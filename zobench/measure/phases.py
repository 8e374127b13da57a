"""``with phases("train"): ...`` records the block's wall time, peak memory (reset at its start) and how busy
the machine was with other work meanwhile."""

from __future__ import annotations

import contextlib
import time

from zobench.measure.load import OtherLoad
from zobench.measure.memory import PeakMemory


class Phases:
    def __init__(self, device: str, into: dict):
        self.device, self.data = device, into

    @contextlib.contextmanager
    def __call__(self, name: str):
        from zobench.cell.record import PhaseMeasure

        start = time.perf_counter()
        with OtherLoad() as load, PeakMemory(self.device) as mem:
            yield
        self.data[name] = PhaseMeasure(wall_s=time.perf_counter() - start, other_cpus=load.other_cpus, **mem.result)
