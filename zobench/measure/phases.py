"""``with phase(device) as numbers: ...`` measures the block: its wall time, its peak memory (reset at its
start) and how busy the machine was with other work meanwhile. Numbers only: the cell turns them into its
record (``cell.timing.Phases``)."""

from __future__ import annotations

import contextlib

from zobench.measure.load import OtherLoad
from zobench.measure.memory import PeakMemory


class Numbers(dict):
    """A phase's figures, filled in once its block is over; meanwhile ``set_aside()`` (a context manager)
    leaves a block inside it out of its peaks (``PeakMemory.set_aside``)."""

    set_aside = None


@contextlib.contextmanager
def phase(device: str):
    """Yields a dict that holds, once the block is over, ``wall_s``, ``cpu_s``, ``other_cpus`` and the ``*_mib``
    peaks of ``measure.memory.PeakMemory``."""
    numbers = Numbers()
    with OtherLoad() as load, PeakMemory(device) as mem:
        numbers.set_aside = mem.set_aside
        yield numbers
    # One clock for the phase's wall time and for the other-load figure's minimum block length.
    numbers.update(wall_s=load.wall_s, cpu_s=load.cpu_s, other_cpus=load.other_cpus, **mem.result)
