"""Suites end to end on the tiny model: child processes, failures, kills, resume, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zobench.launcher import run_suite, select_cells
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

# A config file that exists (so the suite validates) but names no architecture: the cell fails when it
# loads the model, as a real broken config would.
BROKEN = BASE + """
overrides:
  - match: {method: random}
    set: {model: "random:broken.json"}
  - match: {method: full}
    set: {steps: 1000000, timeout_s: 4}
"""


def _run(tmp_path: Path, text: str, resume=False):
    p = tmp_path / "t.yaml"
    p.write_text(text.replace("random:broken.json", f"random:{tmp_path / 'broken.json'}"))
    (tmp_path / "broken.json").write_text('{"hidden_size": 16}')
    return run_suite(load_suite(p), tmp_path / "results", resume=resume)


def test_failed_and_killed_cells_do_not_stop_the_suite_and_resume_redoes_only_them(tmp_path):
    out = _run(tmp_path, BROKEN)
    recs = read_records(out)
    status = sorted((r["labels"]["method"], r["config"]["model"].rsplit("/", 1)[-1], r["status"]) for r in recs)
    # The broken model also gets its own forward reference cell, which fails the same way.
    assert status == [("forward", "broken.json", "failed"), ("forward", "random:tiny-llama", "ok"),
                      ("full", "random:tiny-llama", "timeout"), ("random", "broken.json", "failed")]
    failed = next(r for r in recs if r["labels"]["method"] == "random")
    assert "has no 'model_type'" in failed["reason"] and "Traceback" not in failed["reason"]
    timed_out = next(r for r in recs if r["status"] == "timeout")
    assert "killed" in timed_out["reason"]
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
    fwd = recs["forward"]
    for r in (full, rnd):
        # The ratios are derived from the records' own medians and peaks (timings are never bounded here:
        # on a loaded machine the forward cell can be the slow one).
        d = r["derived"]
        ref = r["metrics"]["forward_ref_s"]
        assert ref["n"] == r["metrics"]["step_s"]["n"]  # one reference forward per timed step
        assert d["forward_ref"] == "in-cell" and d["step_over_two_forwards"] == pytest.approx(
            r["metrics"]["step_s"]["median"] / (2 * ref["median"]))
        assert d["peak_over_inference"] == pytest.approx(d["peak_mib"] / fwd["derived"]["peak_mib"])
    assert rnd["derived"]["speedup_vs_full"] == pytest.approx(
        full["metrics"]["step_s"]["median"] / rnd["metrics"]["step_s"]["median"])
    assert len(full["metrics"]["loss_curve"]) == 3
    assert full["metrics"]["step_s"]["n"] == 2  # warm-up excluded


def test_step_ratio_falls_back_to_the_forward_cell_without_in_cell_forwards():
    from zobench.launcher import derive

    cfg = {"model": "m", "dtype": "float32", "quant": "none", "task": "sst2", "method": "forward"}
    fwd = {"status": "ok", "config": cfg, "metrics": {"step_s": {"median": 2.0}}, "phases": {}}
    old = {"config": {**cfg, "method": "random"}, "metrics": {"step_s": {"median": 5.0}}, "phases": {}}
    new = {**old, "metrics": {"step_s": {"median": 5.0}, "forward_ref_s": {"median": 2.5}}}
    assert derive(old, [fwd])["step_over_two_forwards"] == pytest.approx(1.25)
    assert derive(old, [fwd])["forward_ref"] == "forward cell"
    assert derive(new, [fwd])["step_over_two_forwards"] == pytest.approx(1.0)
    assert derive(new, [fwd])["forward_ref"] == "in-cell"
    assert "step_over_two_forwards" not in derive({**fwd, "config": dict(cfg)}, [fwd])  # not of itself
