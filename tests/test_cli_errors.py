"""Bad input and unwritable outputs at the command line: one line naming the file and key, exit 2, no
traceback; exit 1 only ever means "a budget is broken"; a crash is exit 4 with its traceback saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import limit_file_size, unprivileged, zobench

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": "random:tiny-llama", "task": "sst2", "n_train": 16, "n_dev": 0, "n_test": 0,
        "batch_size": 4, "max_length": 32, "steps": 3, "warmup_steps": 1, "eval_before": False,
        "eval_after": False}


def one_line_error(r: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, r.stderr
    for needle in needles:
        assert needle in err, (needle, err)


def write_suite(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def tiny_suite(tmp_path: Path, **defaults) -> Path:
    lines = ["name: t", "reference: false", "defaults:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in dict(TINY, **defaults).items()]
    lines += ["matrix:", "  method: [forward]"]
    return write_suite(tmp_path / "t.yaml", "\n".join(lines) + "\n")


def record(**fields) -> str:
    rec = {"schema": 1, "suite": "t", "cell_id": "abc", "status": "ok", "labels": {"method": "forward"},
           "config": {"method": "forward"}, "metrics": {}, "phases": {}, "derived": {"peak_mib": 1.0}}
    rec.update(fields)
    return json.dumps(rec)


# -- suites ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["run"], ["run", "--dry-run"], ["estimate"], ["check", "--suite"]])
def test_a_suite_that_is_not_utf8(tmp_path, command):
    suite = tmp_path / "s.yaml"
    suite.write_bytes("name: caf\xe9\n".encode("latin-1"))
    args = command[:1] + ([str(suite)] if command[-1] != "--suite" else ["--suite", str(suite)]) + command[1:-1]
    one_line_error(zobench(*args), str(suite), "not UTF-8")


def test_a_suite_the_user_cannot_read(tmp_path):
    suite = tiny_suite(tmp_path)
    suite.chmod(0)
    try:
        r = zobench("run", suite, "--dry-run", prefix=unprivileged())
    finally:
        suite.chmod(0o644)
    one_line_error(r, str(suite), "not readable")


@pytest.mark.parametrize("defaults, needles", [
    ({"model": "smolm2"}, ["defaults: key 'model'", "did you mean 'smollm2'"]),
    ({"model": "random:tiny-lama"}, ["key 'model'", "did you mean 'tiny-llama'"]),
    ({"model_fallback": "random:nope"}, ["key 'model_fallback'", "no such architecture config"]),
    ({"task": "sst3"}, ["key 'task'", "did you mean 'sst2'"]),
    ({"lr": float("nan")}, ["key 'lr'", "finite"]),
    ({"steps": 10**30}, ["key 'steps'", "at most"]),
    # values a cell would have run with and reported ok (a negative decay, a momentum that never forgets),
    # or failed on after loading its model (no training examples, no calibration batch): refused up front
    ({"weight_decay": -0.1}, ["key 'weight_decay'", ">= 0"]),
    ({"optimizer": "momentum", "momentum": 1.0}, ["key 'momentum'", "[0, 1)"]),
    ({"momentum": -1}, ["key 'momentum'", "[0, 1)"]),
    ({"n_train": 0}, ["key 'n_train'", "runs steps"]),
    ({"calib_sequences": 0}, ["key 'calib_sequences'", ">= 1"]),
])
def test_bad_values_fail_validation_and_dry_run(tmp_path, defaults, needles):
    suite = tiny_suite(tmp_path, **defaults)
    one_line_error(zobench("run", suite, "--dry-run"), str(suite), *needles)


def test_a_key_given_twice(tmp_path):
    suite = write_suite(tmp_path / "d.yaml", "name: d\ndefaults:\n  steps: 3\n  steps: 30\n")
    one_line_error(zobench("run", suite, "--dry-run"), f"{suite}:4", "key 'steps' given twice")


def test_nan_in_yaml_spelling(tmp_path):
    suite = write_suite(tmp_path / "n.yaml", "name: n\ndefaults:\n  lr: .nan\n")
    one_line_error(zobench("estimate", suite), "key 'lr'", "finite")


# -- outputs ---------------------------------------------------------------------------------------------

def test_run_out_naming_a_file_fails_before_any_cell(tmp_path):
    suite = tiny_suite(tmp_path)
    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    r = zobench("run", suite, "--out", blocker, "--reports", tmp_path / "reports")
    one_line_error(r, str(blocker), "is a file")
    assert "[1]" not in r.stderr and not (tmp_path / "reports").exists()  # no cell started


def test_a_report_zobench_would_not_replace_fails_the_run_before_any_cell(tmp_path):
    """The report is written when every cell is done: a file of the report's name that is not zobench's was
    refused then, hours on. Now before the first cell, and kept."""
    suite = tiny_suite(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "t.md").write_text("my notes\n")
    r = zobench("run", suite, "--out", tmp_path / "results", "--reports", tmp_path / "reports")
    one_line_error(r, "t.md", "is not a report zobench wrote")
    assert "[1]" not in r.stderr and (tmp_path / "reports" / "t.md").read_text() == "my notes\n"


def test_a_dry_run_refuses_the_flags_a_run_refuses(tmp_path):
    suite = tiny_suite(tmp_path)
    for flags, needle in ((["--jobs", "0"], "--jobs 0"), (["--retries", "-1"], "--retries -1"),
                          (["--address", "auto"], "only --executor ray"),
                          (["--executor", "ray", "--no-memory-check"], "Ray places each cell")):
        one_line_error(zobench("run", suite, "--dry-run", *flags), needle, "")


def test_run_into_a_read_only_directory_fails_before_any_cell(tmp_path):
    suite = tiny_suite(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = zobench("run", suite, "--out", ro, "--reports", ro,
                    prefix=unprivileged())
    finally:
        ro.chmod(0o755)
    one_line_error(r, str(ro), "not writable")
    assert list(ro.iterdir()) == []


def test_report_under_a_path_that_is_a_file(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text(record() + "\n")
    blocker = tmp_path / "reports"
    blocker.write_text("x")
    one_line_error(zobench("report", results, "--out", blocker / "sub"), "is a file")


def test_train_out_that_cannot_be_written_fails_before_training(tmp_path):
    blocker = tmp_path / "x"
    blocker.write_text("x")
    r = zobench("train", "--model", "random:tiny-llama", "--steps", "1000000", "--out", blocker / "run")
    one_line_error(r, "is a file")


def test_a_full_disk_during_a_run_exits_non_zero_and_leaves_no_fragment(tmp_path):
    suite = tiny_suite(tmp_path)
    results = tmp_path / "results" / "t.jsonl"
    results.parent.mkdir()
    results.write_text(record(pad="x" * 20_000) + "\n")  # an earlier run's record
    before = results.read_bytes()
    # Room for 200 more bytes in any file: the cell runs, its ~3 KB record does not fit.
    r = zobench("run", suite, "--out", results.parent, "--reports", tmp_path / "reports",
                preexec_fn=limit_file_size(len(before) + 200))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "the record was not written and the file is unchanged" in r.stderr
    assert results.read_bytes() == before


def test_report_on_a_full_disk_keeps_the_old_report(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text(record() + "\n")
    out = tmp_path / "rep" / "r.md"
    out.parent.mkdir()
    out.write_text("# zobench report: old\n")  # an earlier report of zobench's (one of the user's is refused)
    r = zobench("report", results, "--out", out.parent, preexec_fn=limit_file_size(100))
    one_line_error(r, str(out.parent), "cannot write the", "nothing was written")
    assert out.read_text() == "# zobench report: old\n"
    left = [p.name for p in out.parent.rglob("*") if p.is_file()]
    assert left == ["r.md"], left  # no half-written plot, no temporary file


# -- results files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, needle", [
    ({"schema": "1"}, "field 'schema'"),
    ({"labels": ["method", "forward"]}, "field 'labels'"),
    ({"config": "forward"}, "field 'config'"),
    ({"status": "fine"}, "field 'status'"),
])
@pytest.mark.parametrize("command", ["check", "report"])
def test_malformed_records(tmp_path, fields, needle, command):
    results = tmp_path / "r.jsonl"
    results.write_text(record(**fields) + "\n")
    args = [command, results] + (["--suite", ROOT / "suites" / "smoke.yaml"] if command == "check"
                                 else ["--out", tmp_path / "reports"])
    one_line_error(zobench(*args), f"{results}:1", needle)


def test_a_results_file_that_is_not_utf8(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_bytes(b'{"cell_id": "\xff"}\n')
    one_line_error(zobench("check", results, "--suite", ROOT / "suites" / "smoke.yaml"), "not UTF-8")
    one_line_error(zobench("report", results, "--out", tmp_path / "reports"), "not UTF-8")


def test_garbage_in_the_middle_of_a_results_file_is_corrupt_but_a_torn_tail_is_not(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text(record() + "\nnot json\n" + record(cell_id="def") + "\n")
    one_line_error(zobench("check", results, "--suite", ROOT / "suites" / "smoke.yaml"), f"{results}:2", "corrupt")
    results.write_text(record() + "\n" + record(cell_id="def")[:40])  # an interrupted append
    r = zobench("check", results, "--suite", ROOT / "suites" / "smoke.yaml", "--measured-only")
    assert r.returncode == 0 and "torn last line" in r.stderr


# -- the guard -------------------------------------------------------------------------------------------

def test_an_internal_error_is_one_line_exit_4_with_the_traceback_saved(monkeypatch, capsys):
    from zobench import cli

    def boom(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("zobench.cli.report.run", boom)
    assert cli.main(["report", "x.jsonl"]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error: ZeroDivisionError: a bug" in err
    saved = Path(err.split("traceback in ")[1].split(";")[0])
    assert "ZeroDivisionError" in saved.read_text()
    saved.unlink()


def test_exit_1_is_only_a_broken_budget(monkeypatch, capsys):
    from zobench import cli

    for exc in (OSError(28, "No space left on device", "/x"), PermissionError(13, "Permission denied", "/y"),
                ValueError("bad"), KeyError("k")):
        def fail(args, exc=exc):
            raise exc
        monkeypatch.setattr("zobench.cli.check.run", fail)
        assert cli.main(["check", "r.jsonl"]) in (2, 4)
    capsys.readouterr()


def _run_until_a_cell_runs(tmp_path: Path, name: str):
    """Start ``zobench run`` on a cell that would train for hours; return (its process, the cell's pid)."""
    import time

    import psutil

    suite = tiny_suite(tmp_path, steps=1_000_000)
    proc = subprocess.Popen([sys.executable, "-m", "zobench.cli", "run", str(suite), "--out", str(tmp_path / name),
                             "--reports", str(tmp_path / f"{name}-reports")], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    def is_cell(child) -> bool:
        # The run also starts short-lived helpers (git for the record's environment, multiprocessing's resource
        # tracker); a helper that just exited is a zombie whose command line cannot be read.
        try:
            return "spawn_main" in " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        children = [c for c in psutil.Process(proc.pid).children() if is_cell(c)]
        if children:
            return proc, children[0].pid
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no cell process started")


def _gone(pid: int, within_s: float = 30) -> bool:
    import psutil

    try:
        psutil.Process(pid).wait(within_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        psutil.Process(pid).kill()
        return False
    return True


def test_sigterm_stops_a_run_like_ctrl_c_and_no_cell_outlives_it(tmp_path):
    import signal

    proc, cell = _run_until_a_cell_runs(tmp_path, "term")
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "zobench: interrupted" in err and "Traceback" not in err, err
    assert _gone(cell)


def test_a_run_killed_outright_takes_its_running_cell_with_it(tmp_path):
    import signal

    proc, cell = _run_until_a_cell_runs(tmp_path, "kill")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # No cell trains on unwatched: the kernel ends it (PR_SET_PDEATHSIG), and a cell that reports progress
    # would also fail its next message on the closed pipe (so this held before the signal was set too).
    assert _gone(cell)


def test_the_train_summary_skips_splits_without_a_score():
    """A run with no test examples scores nothing there ({"accuracy": None}): the one-line summary says what
    it has (the best dev score) and never crashes after the record is written."""
    from zobench.cell.measures import Metrics
    from zobench.cell.record import CellRecord
    from zobench.cli.train import _summary

    m = Metrics()
    m.set(steps_done=3, final_loss=0.5, test_after={"accuracy": None}, best_dev={"accuracy": 0.71})
    line = _summary(CellRecord(cell_id="c", config={"method": "sensitive"}, metrics=m))
    assert "test_after" not in line and "best_dev=accuracy:0.710" in line


def test_train_refuses_a_run_that_would_not_fit_in_memory_and_says_how_to_start_it_anyway(tmp_path, monkeypatch):
    from zobench.measure import machine

    monkeypatch.setattr(machine, "available_memory_mib", lambda: (50.0, "MemAvailable"))
    args = ("train", "--model", "random:tiny-llama", "--method", "random", "--density", "0.05", "--steps", "1",
            "--set", "n_test=0", "--set", "n_dev=0", "--set", "n_train=4", "--set", "batch_size=4")
    r = zobench(*args, "--out", tmp_path / "run")
    one_line_error(r, "train: not started", "50 MiB available (MemAvailable)")
    assert "--no-memory-check" in r.stderr and not (tmp_path / "run" / "record.json").exists()
    r = zobench(*args, "--out", tmp_path / "run", "--no-memory-check")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "record.json").read_text())["metrics"]["steps_done"] == 1
