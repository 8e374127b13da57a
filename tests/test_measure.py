"""Trackers against known allocations."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import torch

from zobench.measure.env import environment, git_state
from zobench.measure.load import OtherLoad
from zobench.measure.memory import PeakMemory


def test_peak_memory_sees_a_known_allocation_within_10_percent():
    size_mib = 256
    with PeakMemory() as m:
        t = torch.ones(size_mib * 1024 * 1024 // 4)  # touched pages: resident
        del t
    grown = m.result["peak_rss_mib"] - m.result["start_rss_mib"]
    assert abs(grown - size_mib) <= 0.10 * size_mib, grown


def test_peaks_reset_per_phase():
    with PeakMemory() as big:
        t = torch.ones(192 * 1024 * 1024 // 4)
        del t
    with PeakMemory() as small:
        t = torch.ones(16 * 1024 * 1024 // 4)
        del t
    assert big.result["peak_rss_mib"] - small.result["peak_rss_mib"] > 150


def test_environment_names_versions_and_hardware():
    env = environment()
    import importlib.metadata

    assert env["versions"]["torch"] == importlib.metadata.version("torch")
    assert torch.__version__.split("+")[0] == env["versions"]["torch"].split("+")[0]
    assert env["cpu_count"] >= 1 and env["torch_threads"] >= 1
    assert isinstance(git_state(), dict)


def test_without_a_gpu_driver_the_device_sampler_says_why_and_records_nothing():
    import torch

    from zobench.measure.device import DeviceMemory

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/test_gpu.py measures it")
    mem = DeviceMemory().start()
    assert mem.error and mem.stop() == {}  # no figure rather than a zero that reads like a measurement


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_other_load_counts_a_busy_neighbour():
    """A sibling process spinning during the block shows up as other CPUs, at least as much as it got."""
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        neighbour = psutil.Process(spinner.pid)
        time.sleep(0.3)
        before = sum(neighbour.cpu_times()[:2])
        with OtherLoad() as load:
            time.sleep(1.5)
        got = (sum(neighbour.cpu_times()[:2]) - before) / 1.5
    finally:
        spinner.kill()
        spinner.wait()
    assert got > 0.2  # the neighbour ran
    assert load.other_cpus >= got - 0.1, (load.other_cpus, got)


def test_other_load_leaves_out_the_measured_process_itself():
    with OtherLoad() as idle:
        time.sleep(1.5)
    me = psutil.Process()
    own = sum(me.cpu_times()[:2])
    with OtherLoad() as busy:
        _spin(1.5)
    own = (sum(me.cpu_times()[:2]) - own) / 1.5
    # Counting its own spinning would add about one CPU: against the quiet block, and against what the
    # machine had left beside it (other work can only use the CPUs this process did not).
    assert busy.other_cpus - idle.other_cpus < 0.5, (idle.other_cpus, busy.other_cpus)
    assert busy.other_cpus <= psutil.cpu_count() - own + 0.1, (busy.other_cpus, own)
    with OtherLoad() as short:
        time.sleep(0.1)
    assert short.other_cpus is None  # too short for 10 ms ticks to mean anything
