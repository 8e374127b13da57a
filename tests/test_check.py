"""Budgets -> violations, and `zobench check`'s exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from zobench.check import check
from zobench.suite import parse_suite

SUITE = {"name": "s", "budgets": [
    {"match": {"method": "sensitive"}, "peak_mib_max": 1000, "peak_over_inference_max": 1.05},
    {"match": {}, "accuracy_min": 0.6},
    {"match": {"method": "full"}, "latency_tolerance": 0.2},
]}


def rec(method, peak, ratio, acc=0.7, step=1.0, cpu="cpuA", cell=None):
    return {"cell_id": cell or method, "status": "ok", "labels": {"method": method},
            "config": {"method": method}, "accuracy_meaningful": True, "env": {"cpu": cpu, "torch_threads": 2},
            "derived": {"peak_mib": peak, "peak_over_inference": ratio},
            "metrics": {"test_after": {"accuracy": acc}, "step_s": {"median": step}}}


def test_violations_name_cell_metric_limit_and_value():
    suite = parse_suite(SUITE, "s.yaml")
    v, _ = check([rec("sensitive", 1200, 1.02), rec("full", 5000, 1.5, acc=0.5)], suite)
    lines = sorted(x.line() for x in v)
    assert lines == ["method=full: accuracy_min limit 0.6, measured 0.5",
                     "method=sensitive: peak_mib_max limit 1000, measured 1200"]
    ok, _ = check([rec("sensitive", 900, 1.01)], suite)
    assert ok == []


def test_latency_only_against_the_same_machine():
    suite = parse_suite(SUITE, "s.yaml")
    v, notes = check([rec("full", 1, 1, step=1.5)], suite, baseline=[rec("full", 1, 1, step=1.0)])
    assert [x.metric for x in v] == ["step_median_s vs baseline"]
    v, notes = check([rec("full", 1, 1, step=1.5)], suite, baseline=[rec("full", 1, 1, step=1.0, cpu="other")])
    assert v == [] and "another machine" in notes[0]


def test_cli_exit_codes(tmp_path):
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SUITE))
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(rec("sensitive", 900, 1.01)) + "\n")
    bad.write_text(json.dumps(rec("sensitive", 1900, 1.01)) + "\n")

    def run(path):
        return subprocess.run([sys.executable, "-m", "zobench.cli", "check", str(path), "--suite",
                               str(tmp_path / "s.yaml")], capture_output=True, text=True, timeout=120)

    assert run(good).returncode == 0
    r = run(bad)
    assert r.returncode == 1 and "peak_mib_max limit 1000, measured 1900" in r.stdout
    r = run(tmp_path / "missing.jsonl")
    assert r.returncode == 2 and "results file not found" in r.stderr and "Traceback" not in r.stderr
