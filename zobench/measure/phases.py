"""``with phases("train"): ...`` records the block's wall time, peak memory (reset at its start) and how busy
the machine was with other work meanwhile."""

from __future__ import annotations

import contextlib

from zobench.measure.load import OtherLoad
from zobench.measure.memory import PeakMemory


class Phases:
    def __init__(self, device: str, into: dict):
        self.device, self.data = device, into

    @contextlib.contextmanager
    def __call__(self, name: str):
        from zobench.cell.record import PhaseMeasure

        with OtherLoad() as load, PeakMemory(self.device) as mem:
            yield
        # One clock for the phase's wall time and for the other-load figure's minimum block length.
        self.data[name] = PhaseMeasure(wall_s=load.wall_s, other_cpus=load.other_cpus, **mem.result)
