"""Suites end to end on the tiny model: child processes, failures, kills, resume, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zobench.launcher import run_suite
from zobench.results import read_records, to_pandas
from zobench.suite import load_suite

BASE = """
name: t
defaults:
  model: "random:tiny-llama"
  n_train: 16
  n_dev: 4
  n_test: 8
  batch_size: 4
  max_length: 48
  steps: 3
  warmup_steps: 1
matrix:
  method: [full, random]
  density: [0.05]
timeout_s: 300
"""

BROKEN = BASE + """
overrides:
  - match: {method: random}
    set: {model: "random:no-such-config"}
  - match: {method: full}
    set: {steps: 1000000, timeout_s: 4}
"""


def _run(tmp_path: Path, text: str, resume=False):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    return run_suite(load_suite(p), tmp_path / "results", resume=resume)


def test_failed_and_killed_cells_do_not_stop_the_suite_and_resume_redoes_only_them(tmp_path):
    out = _run(tmp_path, BROKEN)
    recs = {r["labels"]["method"]: r for r in read_records(out)}
    assert set(recs) == {"forward", "full", "random"}
    assert recs["forward"]["status"] == "ok"
    assert recs["random"]["status"] == "failed"
    assert "no-such-config" in recs["random"]["reason"]
    assert recs["full"]["status"] == "timeout" and "killed" in recs["full"]["reason"]
    first_lines = out.read_text().splitlines()
    assert len(first_lines) == 3 and all(json.loads(line) for line in first_lines)

    # Fixed suite, --resume: the forward cell is kept, only the two broken cells run again.
    out2 = _run(tmp_path, BASE, resume=True)
    lines = out2.read_text().splitlines()
    assert lines[:3] == first_lines
    new = [json.loads(x) for x in lines[3:]]
    assert sorted(r["labels"]["method"] for r in new) == ["full", "random"]
    assert all(r["status"] == "ok" for r in new)
    df = to_pandas(out2)
    assert len(df) == 3 and set(df["status"]) == {"ok"}


def test_record_fields_and_derived_ratios(tmp_path):
    out = _run(tmp_path, BASE)
    recs = {r["labels"]["method"]: r for r in read_records(out)}
    for r in recs.values():
        assert r["schema"] == 1 and r["suite"] == "t" and r["status"] == "ok"
        assert r["env"]["versions"]["torch"] and r["env"]["malloc_mmap_threshold"] == "131072"
        assert r["accuracy_meaningful"] is False  # random weights
        assert r["phases"]["train"]["peak_rss_mib"] > 100
    full, rnd = recs["full"], recs["random"]
    assert rnd["metrics"]["density_obtained"] == pytest.approx(0.05, rel=0.01)
    assert rnd["metrics"]["restore_drift_frac_changed"] == 0.0
    for r in (full, rnd):
        d = r["derived"]
        assert d["step_over_two_forwards"] > 0.5  # a ZO step makes two forwards
        assert d["peak_over_inference"] > 0.8
    assert rnd["derived"]["speedup_vs_full"] > 0
    assert len(full["metrics"]["loss_curve"]) == 3
    assert full["metrics"]["step_s"]["n"] == 2  # warm-up excluded
