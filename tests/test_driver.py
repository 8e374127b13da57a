"""Suites end to end on the tiny model: executors, failures, kills, resume, records, ratios on read."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import psutil
import pytest
import torch

from zobench.analysis.fits import host_need_mib
from zobench.cell.measures import Metrics, PhaseMeasure, Stats
from zobench.cell.record import CellRecord
from zobench.driver import run_suite, select_cells
from zobench.executors import local
from zobench.executors.local import LocalExecutor
from zobench.executors.pool import PoolExecutor
from zobench.measure.machine import available_memory_mib
from zobench.procs import malloc_env
from zobench.results import derive, load_records, to_pandas
from zobench.spec.suite import load_suite

BASE = (Path(__file__).resolve().parent / "data" / "tiny_suite.yaml").read_text()  # as conftest's tiny_suite_run

# A config file that exists (so the suite validates) but names no architecture: the cell fails when it
# loads the model, as a real broken config would.
BROKEN = BASE + """
overrides:
  - match: {method: random}
    set: {model: "random:broken.json"}
  - match: {method: full}
    set: {steps: 1000000, timeout_s: 4}
"""


def _suite(tmp_path: Path, text: str):
    p = tmp_path / "t.yaml"
    p.write_text(text.replace("random:broken.json", f"random:{tmp_path / 'broken.json'}"))
    (tmp_path / "broken.json").write_text('{"hidden_size": 16}')
    return load_suite(p)


def _run(tmp_path: Path, text: str, **kw):
    return run_suite(_suite(tmp_path, text), tmp_path / "results", **kw)


@pytest.mark.slow  # ~50 s; CI keeps kill-and-resume in test_checkpoint.py and test_cli_errors.py
def test_failed_and_killed_cells_do_not_stop_the_suite_and_resume_redoes_only_them(tmp_path):
    out = _run(tmp_path, BROKEN)
    recs = load_records(out)
    status = sorted((r.method, r.config["model"].rsplit("/", 1)[-1], r.status) for r in recs)
    # The broken model also gets its own forward reference cell, which fails the same way.
    assert status == [("forward", "broken.json", "failed"), ("forward", "random:tiny-llama", "ok"),
                      ("full", "random:tiny-llama", "timeout"), ("random", "broken.json", "failed")]
    failed = next(r for r in recs if r.method == "random")
    assert "has no 'model_type'" in failed.reason and "Traceback" not in failed.reason
    timed_out = next(r for r in recs if r.status == "timeout")
    assert "killed" in timed_out.reason
    first_lines = out.read_text().splitlines()
    assert len(first_lines) == 4 and all(json.loads(line) for line in first_lines)

    # Fixed suite, --resume: the forward cell is kept, only the two broken cells run again.
    out2 = _run(tmp_path, BASE, resume=True)
    lines = out2.read_text().splitlines()
    assert lines[:4] == first_lines
    new = [json.loads(x) for x in lines[4:]]
    assert sorted(r["labels"]["method"] for r in new) == ["full", "random"]
    assert all(r["status"] == "ok" for r in new)
    base_ids = {c.cell_id for c in select_cells(load_suite(tmp_path / "t.yaml"))}
    df = to_pandas(out2)
    assert len(base_ids) == 3 and set(df[df["cell_id"].isin(base_ids)]["status"]) == {"ok"}


def test_resume_runs_only_the_cells_without_an_ok_record_and_keeps_every_line(tiny_suite_run, tmp_path):
    """The suite's records with one cell's line taken out, and one cell's marked failed: --resume runs those
    two again and appends them; the lines already there stay byte for byte."""
    lines = tiny_suite_run.read_text().splitlines(keepends=True)
    assert len(lines) == 3
    failed = json.loads(lines[1]) | {"status": "failed", "reason": "injected"}
    kept = [lines[0], json.dumps(failed) + "\n"]
    suite = _suite(tmp_path, BASE)
    out = tmp_path / "results" / tiny_suite_run.name
    out.parent.mkdir()
    out.write_text("".join(kept))
    run_suite(suite, tmp_path / "results", resume=True)
    after = out.read_text().splitlines(keepends=True)
    assert after[:2] == kept
    new = [json.loads(x) for x in after[2:]]
    assert sorted(r["cell_id"] for r in new) == sorted([failed["cell_id"], json.loads(lines[2])["cell_id"]])
    assert all(r["status"] == "ok" for r in new)
    run_suite(suite, tmp_path / "results", resume=True)  # nothing left to run: nothing appended
    assert out.read_text().splitlines(keepends=True) == after


@pytest.fixture(scope="module")
def two_runs(tiny_suite_run, tmp_path_factory):
    """The same suite run twice: sequentially (the session's tiny_suite_run), and two cells at a time with
    the cells in reverse order."""
    tmp = tmp_path_factory.mktemp("runs")
    (tmp / "b").mkdir()
    seq = load_records(tiny_suite_run)
    suite = _suite(tmp / "b", BASE)
    pool = load_records(run_suite(suite, tmp / "b" / "results", cells=list(reversed(select_cells(suite))),
                                  executor=PoolExecutor(jobs=2)))
    return seq, pool


def test_records_are_typed_raw_measurements(two_runs):
    seq, _ = two_runs
    recs = {r.method: r for r in seq}
    for r in recs.values():
        assert r.schema == 2 and r.suite == "t" and r.ok
        assert r.env["versions"]["torch"] and r.env["malloc"] == malloc_env()  # cells choose no malloc option
        assert r.accuracy_meaningful is False  # random weights
        assert r.phases["train"].peak_rss_mib > 100 and r.phases["train"].wall_s > 0
        assert 0 < r.phases["train"].cpu_s and 0 < r.cpu_s == sum(p.cpu_s for p in r.phases.values())
        assert r.execution.executor == "local" and r.execution.concurrent_cells == 1
        for p in r.phases.values():  # how busy the machine was, on every phase long enough to say
            assert p.other_cpus is None if p.wall_s < 0.99 else 0.0 <= p.other_cpus <= os.cpu_count()
        assert "derived" not in r.to_json()  # ratios are never frozen into a record
    # Whether any phase of these tiny cells lasts the second it takes depends on the machine's speed: that
    # a long enough block carries the figure is tests/test_measure.py's (OtherLoad, phase).
    full, rnd = recs["full"], recs["random"]
    assert rnd.metrics.get("density_obtained") == pytest.approx(0.05, rel=0.01)
    assert rnd.metrics.get("restore_drift_frac_changed") == 0.0
    assert rnd.metrics.forward_ref_s.n == rnd.metrics.step_s.n == 2  # one reference forward per timed step
    assert rnd.metrics.step_over_ref.n == 2  # and one ratio per pair, each step over its own two forwards
    passes = rnd.metrics.get("zo_passes")  # which kernel ran the ZO passes, and at what bandwidth
    assert set(passes["paths"]) <= {"c-openmp", "torch"} and sum(passes["paths"].values()) > 0
    assert passes["pass_gb_s"] > 0 and passes["copy_gb_s"] > 0
    assert rnd.metrics.step_over_ref.p10 <= rnd.metrics.step_over_ref.median <= rnd.metrics.step_over_ref.p90
    assert len(full.metrics.get("loss_curve")) == 3  # warm-up steps are in the loss curve, not the timings


def test_pool_runs_cells_side_by_side_and_says_so(two_runs):
    _, pool = two_runs
    assert len(pool) == 3 and len({r.cell_id for r in pool}) == 3  # each cell appended exactly once
    assert {r.execution.executor for r in pool} == {"pool"}
    assert max(r.execution.concurrent_cells for r in pool) == 2
    assert all(r.execution.threads >= 1 for r in pool)


def test_ratios_do_not_depend_on_run_order_or_executor(two_runs):
    seq, pool = two_runs
    for recs in (seq, pool):
        d = derive(recs)
        by = {r.method: r.cell_id for r in recs}
        # Every training cell gets every ratio, whatever ran first (the pool ran the forward cell last).
        for m in ("full", "random"):
            assert {"step_over_two_forwards", "peak_over_inference"} <= set(d[by[m]].to_dict())
        # and the speed-up against full ZO, unless either cell's step timed below its own two forwards (the
        # pool runs two tiny cells at once: the report calls such a median a measurement fault and gives
        # no speed-up from it rather than a wrong one)
        faults = "fault" in (d[by["random"]].step_timing, d[by["full"]].step_timing)
        assert ("speedup_vs_full" in d[by["random"]].to_dict()) != faults
        # Any order of the same records derives the same values, and a cell's ratios need only the cell
        # and its references.
        for perm in itertools.permutations(recs):
            assert derive(list(perm)) == d
        fwd = next(r for r in recs if r.method == "forward")
        rnd = next(r for r in recs if r.method == "random")
        alone = derive([rnd, fwd])[rnd.cell_id]
        assert alone.peak_over_inference == d[rnd.cell_id].peak_over_inference
        assert alone.step_over_two_forwards == d[rnd.cell_id].step_over_two_forwards
    assert {r.cell_id for r in seq} == {r.cell_id for r in pool}
    # Which ratios exist does not depend on the executor; whether a timing reads as a fault (and so gives no
    # speed-up) depends on the machine's moment, not on the code.
    timing = {"step_timing", "speedup_vs_full", "speedup_clock"}
    assert {k: sorted(set(v.to_dict()) - timing) for k, v in derive(seq).items()} == \
        {k: sorted(set(v.to_dict()) - timing) for k, v in derive(pool).items()}


def _rec(method: str, step: float, ref: float | None = None, peak: float = 100.0, cell: str | None = None):
    m = Metrics()
    m.set(step_s=Stats(step, step, step, 3), forward_ref_s=Stats(ref, ref, ref, 3) if ref else None)
    cfg = {"model": "m", "dtype": "float32", "quant": "none", "task": "sst2", "method": method}
    return CellRecord(cell_id=cell or method, config=cfg, labels={"method": method}, metrics=m, device="cpu",
                      phases={"train": PhaseMeasure(wall_s=1.0, peak_rss_mib=peak)})


def test_step_ratio_falls_back_to_the_forward_cell_without_in_cell_forwards():
    fwd = _rec("forward", 2.0, peak=100.0)
    old = _rec("random", 5.0, peak=110.0, cell="old")
    new = _rec("random", 5.0, ref=2.5, cell="new")
    d = derive([fwd, old, new])
    assert d["old"].step_over_two_forwards == pytest.approx(1.25) and d["old"].forward_ref == "forward cell"
    assert d["new"].step_over_two_forwards == pytest.approx(1.0) and d["new"].forward_ref == "in-cell"
    assert d["old"].peak_over_inference == pytest.approx(1.1)
    assert d["forward"].step_over_two_forwards is None and d["forward"].peak_over_inference is None  # itself


@pytest.mark.parametrize("pairs, shown", [((1.21, 1.10, 1.35), "1.21 (1.10-1.35)"),
                                          ((0.97, 0.90, 1.05), "1.00 at limit (0.97, 0.90-1.05)"),
                                          ((0.85, 0.80, 0.92), "fault (0.85, 0.80-0.92)")])
def test_a_step_below_two_forwards_is_the_limit_or_a_fault_never_a_figure(pairs, shown):
    """Per-pair ratios give the figure and its spread; a step cannot cost less than two forwards, so a median
    below 1.00 is read as the limit where its spread reaches 1.00 and flagged as a fault where it does not."""
    from zobench.report.cells import CellView
    from zobench.report.tables import step_ratio

    rec = _rec("random", 5.0, ref=2.0)  # 1.25 by medians: the pairs take precedence
    rec.metrics.set(step_over_ref=Stats(*pairs, 10))
    d = derive([rec])["random"]
    assert (d.step_over_two_forwards, d.step_over_two_forwards_p10, d.step_over_two_forwards_p90) == pairs
    assert d.forward_ref == "in-cell pairs"
    assert d.step_timing == {1.21: None, 0.97: "at limit", 0.85: "fault"}[pairs[0]]
    assert step_ratio(CellView.of(rec, d)) == shown


def test_the_speedup_is_in_reference_forwards_where_both_cells_have_pairs_else_in_seconds():
    """A full-ZO cell timed on a busy machine (steps 2x slower in seconds, its forwards too) against a sparse
    cell timed on an idle one: in seconds the sparse cell looks 3.3x faster, in each cell's own reference
    forwards 1.5 / 1.0 = 1.5x. A median below 1.00 is read as the limit, and a fault gives no speedup."""
    full, sparse = _rec("full", 6.0, ref=2.0), _rec("random", 1.8, ref=0.9)
    full.metrics.set(step_over_ref=Stats(1.5, 1.4, 1.6, 10))
    sparse.metrics.set(step_over_ref=Stats(0.98, 0.9, 1.05, 10))
    d = derive([full, sparse])
    assert d["random"].speedup_vs_full == pytest.approx(1.5) and d["random"].speedup_clock == "reference forwards"
    assert d["full"].speedup_vs_full == pytest.approx(1.0)
    sparse.metrics.set(step_over_ref=Stats(0.85, 0.8, 0.92, 10))  # a fault: not a figure
    assert derive([full, sparse])["random"].speedup_vs_full is None
    old = _rec("random", 1.8, ref=0.9, cell="old")  # no pairs: seconds, and the report says so
    d = derive([full, old])["old"]
    assert d.speedup_vs_full == pytest.approx(6.0 / 1.8) and d.speedup_clock == "seconds"


def test_a_re_run_reference_is_the_latest_record_of_that_cell():
    first, rerun = _rec("forward", 2.0, peak=100.0), _rec("forward", 2.0, peak=200.0)
    rnd = _rec("random", 5.0, peak=220.0)
    for recs in ([first, rerun, rnd], [rnd, first, rerun]):
        assert derive(recs)["random"].peak_over_inference == pytest.approx(1.1)


def test_the_gguf_conversion_process_is_tied_to_the_run_first(monkeypatch):
    """Like a cell's process, the one that converts a GGUF model dies with the run that started it
    (``procs.die_with_parent``, tested on its own in test_security), before it converts anything."""
    import zobench.driver as driver

    calls = []
    monkeypatch.setattr(driver, "die_with_parent", lambda parent: calls.append(("tied", parent)))
    monkeypatch.setattr(driver, "converted_gguf_dir", lambda path: calls.append(("converted", path.name)))
    driver._convert("/models/m.gguf", 4242)
    assert calls == [("tied", 4242), ("converted", "m.gguf")]


def test_a_cell_that_would_not_fit_in_memory_is_recorded_and_not_started_and_resume_runs_it(tmp_path, monkeypatch):
    """With less memory available than a cell's estimated peak, the cell gets an unsupported record naming
    both figures and no process; the run goes on. --resume runs it once it fits; --no-memory-check (the
    executor's ``memory_check=False``) starts it whatever the reading."""
    monkeypatch.setattr(local, "available_memory_mib", lambda: (100.0, "MemAvailable"))
    suite = _suite(tmp_path, BASE)
    out = run_suite(suite, tmp_path / "results", only="method=full", executor=LocalExecutor())
    (rec,) = load_records(out)
    need = host_need_mib(select_cells(suite, "method=full")[0].config)
    assert rec.status == "unsupported" and not rec.phases  # never started
    assert need > 100 and f"{need:,.0f} MiB" in rec.reason and "100 MiB available (MemAvailable)" in rec.reason
    monkeypatch.setattr(local, "available_memory_mib", lambda: (10.0**7, "MemAvailable"))
    out = run_suite(suite, tmp_path / "results", only="method=full", executor=LocalExecutor(), resume=True)
    assert [r.status for r in load_records(out)] == ["unsupported", "ok"]  # it ran once it fitted
    monkeypatch.setattr(local, "available_memory_mib", lambda: (1.0, "cgroup limit 1 MiB"))
    out = run_suite(suite, tmp_path / "results", only="method=random", executor=LocalExecutor(memory_check=False))
    assert [(r.method, r.status) for r in load_records(out)][2:] == [("random", "ok")]


def test_available_memory_is_the_kernels_figure_or_what_a_cgroup_limit_leaves(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   2097152 kB\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    assert available_memory_mib(meminfo, cg) == (2048.0, "MemAvailable")
    (cg / "memory.max").write_text("max\n")
    (cg / "memory.current").write_text("5\n")
    assert available_memory_mib(meminfo, cg) == (2048.0, "MemAvailable")  # no limit
    (cg / "memory.max").write_text(f"{1536 * 2**20}\n")
    (cg / "memory.current").write_text(f"{512 * 2**20}\n")
    assert available_memory_mib(meminfo, cg) == (1024.0, "cgroup limit 1,536 MiB")
    (cg / "memory.current").write_text("not a number\n")  # unreadable usage: the kernel's figure stands
    assert available_memory_mib(meminfo, cg) == (2048.0, "MemAvailable")
    assert available_memory_mib(tmp_path / "none", tmp_path / "none") is None


def test_cells_side_by_side_wait_for_memory_a_running_cell_may_still_take(tmp_path, monkeypatch):
    """Two cells with room for one and a half: the pool starts the second only when the first has ended (a
    running cell keeps room for its estimated peak less its RSS), where it runs both at once with room to
    spare (test_pool_runs_cells_side_by_side_and_says_so); neither is refused."""
    suite = _suite(tmp_path, BASE)
    cells = select_cells(suite, "method=full|random")
    room = 1.5 * max(host_need_mib(c.config) for c in cells)

    def available():  # a machine with `room` MiB besides this process: less what the cells hold now
        held = sum(p.memory_info().rss for p in psutil.Process().children(recursive=True) if p.is_running())
        return room - held / 2**20, "MemAvailable"

    monkeypatch.setattr(local, "available_memory_mib", available)
    out = run_suite(suite, tmp_path / "results", only="method=full|random", executor=PoolExecutor(jobs=2))
    recs = load_records(out)
    assert sorted(r.method for r in recs) == ["full", "random"] and all(r.ok for r in recs)
    assert [r.execution.concurrent_cells for r in recs] == [1, 1]
    first, second = sorted(recs, key=lambda r: r.started_at)
    assert second.started_at >= first.finished_at  # one after the other (ISO times, to the second)


def test_a_gpu_cell_on_a_machine_without_one_is_not_held_to_the_memory_check():
    """Its own record says it needs a GPU; the memory check does not speak first (llama7b's sensitive cells
    hold ~10 GiB of host memory while their mask is built)."""
    suite = load_suite(Path(__file__).resolve().parents[1] / "suites" / "llama7b.yaml")
    cell = select_cells(suite, "method=sensitive,quant=nf4,task=sst2")[0]
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert host_need_mib(cell.config) is None
    cpu = select_cells(load_suite(Path(__file__).resolve().parents[1] / "suites" / "llama7b-cpu.yaml"),
                       "method=sensitive")[0]
    assert host_need_mib(cpu.config) > 4000  # a 7B NF4 cell on the CPU: its RSS estimate
