"""How busy the machine was with anything but the measured process, during a phase.

A timing taken beside other work is slower than the same work on an idle machine, and a cell's record
cannot tell which from its wall time alone. ``OtherLoad`` reads the machine's CPU times (``psutil.cpu_times``)
and this process's own at the start and end of a block:

    other_cpus = (machine busy CPU-seconds - this process's CPU-seconds) / wall seconds

the average number of CPUs taken by other programs (and, on a virtual machine, by the hypervisor's steal)
while the block ran: 0.0 on an idle machine, about 1.0 when one other single-threaded job ran beside it.
Busy is everything but idle and iowait. The kernel counts CPU time in ticks (10 ms), so short blocks are
noisy; the figure is only kept for blocks of at least a second.
"""

from __future__ import annotations

import time

import psutil

MIN_WALL_S = 1.0
# Timings taken beside this much other work (a quarter of a CPU on average) are flagged in reports, and a
# claim about seconds is not decided by them when the other side ran on a quieter machine.
LOADED_CPUS = 0.25


def _busy_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _own_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def own_cpu_s() -> float:
    """This process's CPU seconds so far, its threads and children included."""
    return _own_s(psutil.Process())


class OtherLoad:
    """``with OtherLoad() as load: ...`` then ``load.wall_s``, ``load.cpu_s`` (this process's own CPU seconds
    in the block, its threads and children included: what the work cost, whatever ran beside it or however
    long the process was stopped) and ``load.other_cpus`` (None when the block was shorter than
    ``MIN_WALL_S``). A caller that records the block's wall time takes ``wall_s`` from here, so that whether
    ``other_cpus`` is kept follows from the wall time recorded beside it."""

    def __init__(self):
        self.wall_s: float | None = None
        self.cpu_s: float | None = None
        self.other_cpus: float | None = None
        self._proc = psutil.Process()

    def __enter__(self):
        self._start = (time.perf_counter(), _busy_s(), _own_s(self._proc))
        return self

    def __exit__(self, *exc):
        wall, busy, own = (time.perf_counter(), _busy_s(), _own_s(self._proc))
        self.wall_s = wall - self._start[0]
        self.cpu_s = round(own - self._start[2], 3)
        if self.wall_s >= MIN_WALL_S:
            other = (busy - self._start[1]) - (own - self._start[2])
            self.other_cpus = round(max(0.0, other / self.wall_s), 3)
        return False
