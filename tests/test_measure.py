"""Trackers against known allocations."""

from __future__ import annotations

import pytest
import torch

from zobench.measure.env import environment, git_state
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
