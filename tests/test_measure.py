"""Trackers against known allocations."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import torch

from zobench.measure.env import environment
from zobench.measure.load import OtherLoad
from zobench.measure.machine import SOURCE, git_state
from zobench.measure.memory import PeakMemory


def test_peak_memory_sees_a_known_allocation_within_10_percent():
    size_mib = 256
    with PeakMemory() as m:
        t = torch.ones(size_mib * 1024 * 1024 // 4)  # touched pages: resident
        del t
    grown = m.result["peak_rss_mib"] - m.result["start_rss_mib"]
    assert abs(grown - size_mib) <= 0.10 * size_mib, grown


def test_a_record_says_how_its_peak_was_read_and_the_sampler_sees_an_allocation(monkeypatch):
    """Where the kernel's high-water mark can be reset (here) the peak is exact and says "hwm"; where it cannot,
    RSS is sampled every 5 ms, says "sampled", and still sees an allocation held for 100 ms."""
    import zobench.measure.memory as memory

    with PeakMemory() as exact:
        pass
    assert exact.result["rss_method"] == "hwm"
    monkeypatch.setattr(memory, "_reset_hwm", lambda: False)
    with PeakMemory() as sampled:
        t = torch.ones(128 * 1024 * 1024 // 4)
        time.sleep(0.1)
        del t
    assert sampled.result["rss_method"] == "sampled"
    assert sampled.result["peak_rss_mib"] - sampled.result["start_rss_mib"] > 115


def test_peaks_reset_per_phase():
    with PeakMemory() as big:
        t = torch.ones(192 * 1024 * 1024 // 4)
        del t
    with PeakMemory() as small:
        t = torch.ones(16 * 1024 * 1024 // 4)
        del t
    assert big.result["peak_rss_mib"] - small.result["peak_rss_mib"] > 150


def test_a_phase_starts_without_the_heap_pages_earlier_work_freed():
    """Small blocks come from glibc's heap, which keeps their pages when they are freed below a live block:
    a phase that started on them would carry an earlier phase's history in its figures."""
    script = """
import torch
from zobench.measure.memory import PeakMemory, current_rss_mib
blocks = [torch.ones(16 * 1024) for _ in range(3000)]  # 64 KiB each: from the heap, not mmap
last = blocks[-1]  # keeps the heap's top in use: nothing below it is returned on free
del blocks
kept = current_rss_mib()
with PeakMemory("cpu") as m:
    pass
print(kept - m.result["start_rss_mib"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(out.stdout.split()[-1]) > 100  # of the 187 MiB freed


def test_the_heap_pages_a_block_set_aside_freed_are_not_the_phases_peak():
    """A dev evaluation set aside inside training frees its blocks into glibc's heap, which keeps their pages
    below a live block; measuring starts again after it, so those pages must go back first, or the training
    phase's peak would carry the evaluation's (under malloc's defaults, as cells run)."""
    script = """
import torch
from zobench.measure.memory import PeakMemory
with PeakMemory("cpu") as m:
    with m.set_aside():
        blocks = [torch.ones(16 * 1024) for _ in range(3000)]  # 64 KiB each: from the heap, not mmap
        last = blocks[-1]  # keeps the heap's top in use: nothing below it is returned on free
        del blocks
print(m.result["peak_rss_mib"] - m.result["start_rss_mib"])
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert float(out.stdout.split()[-1]) < 60  # of the 187 MiB the block touched and freed


def test_environment_names_versions_and_hardware():
    env = environment()
    import importlib.metadata

    assert env["versions"]["torch"] == importlib.metadata.version("torch")
    assert torch.__version__.split("+")[0] == env["versions"]["torch"].split("+")[0]
    assert env["cpu_count"] >= 1 and env["torch_threads"] >= 1
    state = git_state()
    if state:  # a git checkout (CI's is one): the commit is HEAD's
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE, capture_output=True, text=True)
        assert state["commit"] == head.stdout.strip() and isinstance(state["dirty"], bool)
    else:
        assert not (SOURCE / ".git").exists()


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


SPINNER = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"


def test_other_load_counts_neighbours_and_leaves_out_the_measured_process():
    """Spinning neighbours on all CPUs but one, and this process spinning too: the machine is saturated
    whatever else runs. Other CPUs must hold at least what the neighbours got, and at most what this
    process left (counting itself would reach about every CPU)."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPINNER]) for _ in range(max(1, psutil.cpu_count() - 1))]
    try:
        neighbours = [psutil.Process(p.pid) for p in spinners]
        time.sleep(0.5)
        me = psutil.Process()

        def cpu_s():
            return sum(sum(n.cpu_times()[:2]) for n in neighbours), sum(me.cpu_times()[:2])

        (theirs, mine), start = cpu_s(), time.perf_counter()
        with OtherLoad() as load:
            _spin(2.0)
        wall = time.perf_counter() - start
        theirs, mine = [(b - a) / wall for a, b in zip((theirs, mine), cpu_s())]
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert theirs > 0.2 and mine > 0.2  # both ran
    assert load.other_cpus >= theirs - 0.1, (load.other_cpus, theirs)
    assert load.other_cpus <= psutil.cpu_count() - mine + 0.1, (load.other_cpus, mine)


def test_a_blocks_cpu_seconds_are_its_own_work_not_its_wall_time():
    """A stopped or waiting process spends wall time but no CPU: the budget figure a pilot reports."""
    with OtherLoad() as waiting:
        time.sleep(1.0)
    with OtherLoad() as working:  # half a second of this thread's CPU, however long that takes on this machine
        end = time.thread_time() + 0.5
        while time.thread_time() < end:
            pass
    assert waiting.wall_s >= 1.0 and waiting.cpu_s < 0.2, waiting.cpu_s
    assert 0.45 <= working.cpu_s <= working.wall_s + 0.05, (working.cpu_s, working.wall_s)  # ticks of 10 ms


def test_other_load_is_left_out_for_blocks_too_short_to_tell():
    with OtherLoad() as short:
        time.sleep(0.1)
    assert short.other_cpus is None  # 10 ms ticks over 0.1 s mean nothing


def test_a_phase_keeps_the_other_load_exactly_when_its_recorded_wall_time_is_long_enough(monkeypatch):
    """The phase's wall time and the other-load figure come from one clock: a phase recorded as lasting at
    least MIN_WALL_S always says how busy the machine was, a shorter one never does."""
    from zobench.measure import load as load_mod
    from zobench.measure.phases import phase

    ticks = iter(x * 0.4 for x in range(1000))  # every read of the clock is 0.4 s after the previous
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    with phase("cpu") as m:
        pass
    assert (m["other_cpus"] is None) == (m["wall_s"] < load_mod.MIN_WALL_S), (m["wall_s"], m["other_cpus"])


def test_a_block_set_aside_in_a_phase_is_measured_apart_and_left_out_of_its_peak_and_seconds():
    """A dev evaluation inside training: 300 MiB touched inside the aside block show in its own phase's
    peak, not in the training phase's; 150 MiB touched in the phase itself after the block do (measuring
    starts again after it); two blocks of one name add up."""
    import numpy as np

    from zobench.cell.timing import Phases

    def touch(mib):
        a = np.ones(mib << 17)  # float64: mib MiB, every page written
        time.sleep(0.05)
        return float(a[-1])

    data = {}
    phases = Phases("cpu", data)
    with phases("train"):
        touch(20)
        for _ in range(2):
            with phases.aside("eval_dev"):
                touch(300)
                time.sleep(0.2)
    train, dev = data["train"], data["eval_dev"]
    assert dev.peak_rss_mib - dev.start_rss_mib > 290
    assert train.peak_rss_mib < dev.peak_rss_mib - 200  # the evaluations' 300 MiB are not the training's
    assert dev.wall_s > 0.4 and train.wall_s < dev.wall_s  # the two 0.25 s blocks, summed, not in train's
    with phases("train"):
        with phases.aside("eval_dev"):
            touch(10)
        touch(150)  # after the block: still the phase's
    assert data["train"].peak_rss_mib - data["train"].start_rss_mib > 140


def test_records_name_the_cpu_instructions_that_choose_kernels():
    from zobench.measure.machine import KERNEL_FLAGS, cpu_flags

    flags = cpu_flags()
    assert set(flags) <= set(KERNEL_FLAGS) and environment()["cpu_flags"] == flags
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True) if shutil.which("lscpu") else None
    if lscpu is not None and lscpu.returncode == 0:  # util-linux's own reading of the CPU, where installed
        have = next((line.split(":", 1)[1].split() for line in lscpu.stdout.splitlines()
                     if line.startswith("Flags:")), None)
        if have is not None:
            assert flags == [f for f in KERNEL_FLAGS if f in have]


def test_no_warning_a_user_cannot_act_on_when_bitsandbytes_loads():
    """On an AVX512-BF16 CPU bitsandbytes warns at import that it could not fetch a kernel from the hub;
    zobench runs offline, so that line is dropped (and only that one)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import zobench, logging, bitsandbytes; "
                        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another warning')"],
                       capture_output=True, text=True, timeout=300)
    assert "kernels-community" not in r.stderr
    assert "another warning" in r.stderr


@pytest.mark.parametrize("mode", ["release", "glibc"])
def test_a_cells_malloc_setting_decides_whether_freed_blocks_stay_resident(mode):
    """A cell process started with ``child_env("release")`` hands freed blocks over 128 KiB back to the OS
    (a phase's peak is live memory); with ``child_env("glibc")`` malloc keeps its own dynamic threshold, under
    which, once such a block was freed, later ones come from the heap and stay resident below a live block
    (what a user's process does)."""
    from zobench.procs import child_env

    script = """
import torch
from zobench.measure.memory import current_rss_mib
first = torch.ones(64 * 1024)
del first  # one 256 KiB block freed: glibc raises its threshold above it
blocks = [torch.ones(64 * 1024) for _ in range(600)]  # 256 KiB each, 150 MiB
last = torch.ones(64 * 1024)  # allocated after them: keeps the heap's top in use
before = current_rss_mib()
del blocks
print(before - current_rss_mib())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(child_env(mode))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    freed = float(out.stdout.split()[-1])
    assert freed > 120 if mode == "release" else freed < 30  # of the 150 MiB freed


def test_a_mapped_file_in_huge_pages_is_recorded_and_the_report_says_what_it_does_to_peaks(tmp_path, monkeypatch):
    """The page cache (a filesystem's large folios, or khugepaged) may hold a long-mapped model file in 2 MiB
    pages; touching one value then maps a whole one, and a cell's peaks read high (the default suite's
    sensitive cell: train peak 1134 MiB against 982 on a fresh copy of the file). The kernel's FilePmdMapped
    is kept with the phase and flagged."""
    from zobench.cell.measures import PhaseMeasure
    from zobench.cell.record import CellRecord
    from zobench.measure import memory
    from zobench.report import render_report

    (tmp_path / "smaps_rollup").write_text("Rss:  976644 kB\nFilePmdMapped:     45056 kB\nAnonymous: 8 kB\n")
    monkeypatch.setattr(memory, "_PROC", tmp_path)
    assert memory.file_huge_mib() == 44.0
    (tmp_path / "smaps_rollup").write_text("Rss:  976644 kB\n")
    assert memory.file_huge_mib() is None
    monkeypatch.undo()

    m = PhaseMeasure(wall_s=1.0, peak_rss_mib=1134.0, file_huge_mib=44.0)
    assert PhaseMeasure.from_json(m.to_json(), "train") == m
    assert "file_huge_mib" not in PhaseMeasure(wall_s=1.0, peak_rss_mib=900.0).to_json()
    rec = CellRecord("c1", labels={"method": "sensitive"}, phases={"train": m})
    md = render_report([rec], tmp_path / "r.md").read_text()
    assert "1 cell ran with part of a mapped file (the model's checkpoint) in 2 MiB pages (up to 44 MiB" in md
    plain = CellRecord("c2", labels={"method": "sensitive"}, phases={"train": PhaseMeasure(wall_s=1.0)})
    assert "2 MiB pages" not in render_report([plain], tmp_path / "p.md").read_text()


def test_tokens_per_second_is_a_typical_steps_and_one_stalled_step_does_not_move_it():
    from types import SimpleNamespace

    from zobench.cell.measures import Metrics
    from zobench.cell.timing import StepTiming

    def step(seconds):
        return SimpleNamespace(loss=0.5, directions=[], total_s=seconds, seconds={"forward": seconds})

    def throughput(stall):
        t = StepTiming()
        for s in [0.5, 0.5, 0.5, 0.5, stall]:
            t.add(step(s), tokens=100, timed=True)
        m = Metrics()
        t.into(m, None)
        return m, m.get("tokens_per_s")

    m, quiet = throughput(0.5)
    _, stalled = throughput(600.0)  # the process paused for ten minutes in one step
    assert quiet == stalled == 200.0
    assert Metrics.from_json(m.to_json()).throughput() == 200.0
    # a record from before tokens_per_step was kept reads as recorded
    assert Metrics.from_json({"tokens_per_s": 3.5, "step_s": {"median": 0.5, "p10": 0.5, "p90": 0.5}}
                             ).throughput() == 3.5
