"""Budgets -> violations, and `zobench check`'s exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import zobench

from zobench.analysis.check import Estimate, check
from zobench.cell.measures import Metrics, PhaseMeasure, Stats
from zobench.cell.record import CellRecord
from zobench.spec.suite import parse_suite

SUITE = {"name": "s", "budgets": [
    {"match": {"method": "sensitive"}, "peak_mib_max": 1000, "peak_over_inference_max": 1.05},
    {"match": {}, "accuracy_min": 0.6},
    {"match": {"method": "full"}, "latency_tolerance": 0.2},
]}


def rec(method, peak, acc=0.7, step=1.0, cpu="cpuA", cell=None) -> CellRecord:
    """A measured cell: its train-phase peak, test accuracy and step median (ratios derive from these)."""
    m = Metrics()
    m.set(test_after={"accuracy": acc} if method != "forward" else None, step_s=Stats(step, step, step, 5))
    return CellRecord(cell_id=cell or method, labels={"method": method}, config={"method": method, "model": "m"},
                      env={"cpu": cpu, "torch_threads": 2}, device="cpu", metrics=m,
                      phases={"train": PhaseMeasure(wall_s=1.0, peak_rss_mib=peak)})


def as_json(r: CellRecord) -> str:
    return json.dumps(r.to_json())


def test_violations_name_cell_metric_limit_and_value():
    suite = parse_suite(SUITE, "s.yaml")
    fwd = rec("forward", 800)
    v, _ = check([rec("sensitive", 1200), rec("full", 5000, acc=0.5), fwd], suite)
    lines = sorted(x.line() for x in v)
    assert lines == ["method=full: accuracy_min limit 0.6, measured 0.5",
                     "method=sensitive: peak_mib_max limit 1000, measured 1200 (rss peak, in phase train)",
                     "method=sensitive: peak_over_inference_max limit 1.05, measured 1.5"]
    ok, _ = check([rec("sensitive", 808), fwd], suite)  # 1.01x its forward, under 1000 MiB
    assert ok == []


def test_a_peak_budget_on_glibc_cells_says_their_peaks_carry_the_heap():
    """A cell under malloc: glibc may be held to a peak budget (it is checked as any other), with a note that
    its peak varies with what the heap kept; release cells and step budgets get none."""
    suite = parse_suite(SUITE, "s.yaml")
    cells = [rec("sensitive", 808), rec("forward", 800), rec("full", 900)]
    v, notes = check(cells, suite)
    assert v == [] and notes == []
    for r in cells:
        r.config["malloc"] = "glibc"
    v, notes = check(cells, suite)
    assert v == [] and len(notes) == 1 and notes[0].startswith("1 cell(s) with malloc: glibc are held to a peak")
    step_only = parse_suite({"name": "s", "budgets": [{"match": {}, "step_over_two_forwards_max": 1.3}]}, "s.yaml")
    assert check(cells, step_only)[1] == []


def test_an_absolute_budget_holds_the_whole_cell_and_a_budget_may_name_its_phases():
    """A cell whose load phase breaks peak_mib_max fails the check though its training fits; a budget that
    names the training phases holds only those; the ratio to inference stays on the training phases unless
    its budget names others."""
    fwd = rec("forward", 800)
    cell = rec("sensitive", 808)
    cell.phases["load"] = PhaseMeasure(wall_s=1.0, peak_rss_mib=1700)
    whole = parse_suite({"name": "s", "budgets": [{"match": {}, "peak_mib_max": 1000}]}, "s.yaml")
    v, _ = check([cell, fwd], whole)
    assert [x.line() for x in v] == \
        ["method=sensitive: peak_mib_max limit 1000, measured 1700 (rss peak, in phase load)"]
    training = parse_suite({"name": "s", "budgets": [{"match": {}, "peak_mib_max": 1000,
                                                      "phases": ["warmup", "train"]}]}, "s.yaml")
    assert check([cell, fwd], training)[0] == []
    ratio = {"name": "s", "budgets": [{"match": {"method": "sensitive"}, "peak_over_inference_max": 1.05}]}
    assert check([cell, fwd], parse_suite(ratio, "s.yaml"))[0] == []  # 808 / 800 in training
    ratio["budgets"][0]["phases"] = ["load", "train"]
    v, _ = check([cell, fwd], parse_suite(ratio, "s.yaml"))
    assert [(x.metric, round(x.measured, 3)) for x in v] == [("peak_over_inference_max", 2.125)]


def test_a_budgets_phases_must_be_phases_of_a_peak_limit():
    import pytest

    from zobench.errors import UserError

    for bad, says in (({"peak_mib_max": 1, "phases": ["lunch"]}, "phases: expected a list of phases"),
                      ({"peak_mib_max": 1, "phases": "train"}, "phases: expected a list"),
                      ({"accuracy_min": 0.5, "phases": ["train"]}, "only a peak limit")):
        with pytest.raises(UserError, match=says):
            parse_suite({"name": "s", "budgets": [{"match": {}, **bad}]}, "s.yaml")


def test_latency_only_against_the_same_machine():
    suite = parse_suite(SUITE, "s.yaml")
    v, notes = check([rec("full", 1, step=1.5)], suite, baseline=[rec("full", 1, step=1.0)])
    assert [x.metric for x in v] == ["step_median_s vs baseline"]
    v, notes = check([rec("full", 1, step=1.5)], suite, baseline=[rec("full", 1, step=1.0, cpu="other")])
    assert v == [] and "another machine" in notes[0]


def test_cli_exit_codes(tmp_path):
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SUITE))
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(as_json(rec("sensitive", 900)) + "\n")
    bad.write_text(as_json(rec("sensitive", 1900)) + "\n")

    def run(path):  # the first check on a fresh machine measures the estimator's calibration: minutes under load
        return zobench("check", path, "--suite", tmp_path / "s.yaml")

    assert run(good).returncode == 0
    r = run(bad)
    assert r.returncode == 1 and "peak_mib_max limit 1000, measured 1900" in r.stdout
    r = run(tmp_path / "missing.jsonl")
    assert r.returncode == 2 and "results file not found" in r.stderr and "Traceback" not in r.stderr


def test_check_finds_the_records_suite_from_another_folder(tmp_path):
    """Records name their suite as `zobench run` was given it (suites/s.yaml, from where the run was): a check
    from elsewhere looks for it above the results folder too."""
    import dataclasses

    import yaml

    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "s.yaml").write_text(yaml.safe_dump(SUITE))
    (tmp_path / "results").mkdir()
    bad = tmp_path / "results" / "s.jsonl"
    bad.write_text(as_json(dataclasses.replace(rec("sensitive", 1900), suite="s", suite_file="suites/s.yaml")) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = zobench("check", bad, "--measured-only", cwd=elsewhere)
    assert r.returncode == 1 and "peak_mib_max limit 1000, measured 1900" in r.stdout
    (tmp_path / "suites" / "s.yaml").unlink()
    r = zobench("check", bad, "--measured-only", cwd=elsewhere)
    assert r.returncode == 2 and "suites/s.yaml" in r.stderr and "Traceback" not in r.stderr


# -- cells without a measurement are checked by their estimates -------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_estimates_are_held_to_peak_budgets_only():
    suite = parse_suite(SUITE, "s.yaml")
    est = Estimate("sensitive", {"method": "sensitive"}, {"method": "sensitive"}, "cpu", 1200.0)
    v, _ = check([rec("forward", 100)], suite, estimates=[est])
    # peak_mib_max applies; the ratio (2.0 > 1.05) and accuracy limits are not checked on an estimate
    assert [x.line() for x in v] == ["method=sensitive [estimated]: peak_mib_max limit 1000, measured 1200"]


def test_an_estimate_is_held_for_its_whole_cell_unless_the_budget_names_phases():
    phases = {"load": 3000.0, "mask": 3100.0, "quantize": 3500.0, "train": 1200.0}
    est = Estimate("magnitude", {"method": "magnitude"}, {"method": "magnitude"}, "cpu", 1200.0, phases=phases)
    whole = parse_suite({"name": "s", "budgets": [{"match": {}, "peak_mib_max": 2000}]}, "s.yaml")
    v, _ = check([], whole, estimates=[est])
    assert [x.line() for x in v] == ["method=magnitude [estimated]: peak_mib_max limit 2000, measured 3500 "
                                     "(in phase quantize)"]
    training = parse_suite({"name": "s", "budgets": [{"match": {}, "peak_mib_max": 2000,
                                                      "phases": ["warmup", "train"]}]}, "s.yaml")
    assert check([], training, estimates=[est])[0] == []
    load = parse_suite({"name": "s", "budgets": [{"match": {}, "peak_mib_max": 2000, "phases": ["load"]}]}, "s.yaml")
    assert [x.measured for x in check([], load, estimates=[est])[0]] == [3000.0]


def test_unmeasured_and_unsupported_cells_are_estimated():
    from zobench.cli.estimate import estimate_missing  # what `zobench check` runs: the machine calibrated first
    from zobench.spec.matrix import expand

    suite = parse_suite({"name": "t", "defaults": {"model": "random:tiny-llama", "max_length": 32},
                         "matrix": {"method": ["full", "random"]}}, "t.yaml")
    cells = {c.config.method: c for c in expand(suite)}
    measured = [CellRecord(cells["forward"].cell_id),
                CellRecord(cells["full"].cell_id, status="unsupported",
                           reason="needs a CUDA device (device=cuda); this machine has none")]
    estimates, lines = estimate_missing(suite, measured)
    assert {e.cell_id for e in estimates} == {cells["full"].cell_id, cells["random"].cell_id}
    assert all(e.peak_mib > 0 and e.calibration["source"] == "measured" for e in estimates)
    full_line = next(line for line in lines if "method=full" in line)
    assert full_line.startswith("estimated: ") and "record unsupported: needs a CUDA device" in full_line
    assert "x its forward's estimate" in next(line for line in lines if "method=random" in line)


def _main(capsys, *args) -> tuple[int, str]:
    """`zobench check ARGS` in this process (the estimator's imports and architectures are paid once)."""
    from zobench.cli import main

    code = main(["check", *args])
    return code, capsys.readouterr().out


def test_llama7b_suite_is_checked_by_estimates_without_results(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out = _main(capsys, "--suite", "suites/llama7b.yaml")
    assert code == 0, out
    estimated = [line for line in out.splitlines() if line.startswith("estimated: ")]
    assert any(line.startswith("estimated: quant=nf4 method=sensitive") for line in estimated)
    assert "by estimate" in out.splitlines()[-1]


def test_a_tightened_budget_fails_naming_the_estimated_cell(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = yaml.safe_load((ROOT / "suites" / "llama7b.yaml").read_text())
    data["budgets"].append({"match": {"method": "sensitive", "quant": "nf4"}, "peak_mib_max": 3000})
    (tmp_path / "tight.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    code, out = _main(capsys, "--suite", str(tmp_path / "tight.yaml"))
    assert code == 1, out
    broken = [line for line in out.splitlines() if "peak_mib_max limit 3000" in line]
    assert len(broken) == 2  # sst2 and rte
    assert all(line.startswith("quant=nf4 method=sensitive density=0.001 task=") and "[estimated]" in line
               for line in broken)


def test_check_input_errors_are_one_line():
    for args in (("--suite", "no/such/suite.yaml"), ()):
        r = zobench("check", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cells_whose_lr_a_pilot_chose_are_found_by_their_records_not_estimated_again():
    """A cell's record has the id of the lr its pilots chose, not the suite's declared lr: the check finds it
    there (it once estimated every piloted cell as if it had no record), and a cell still waiting for its
    pilots is estimated with the reason said."""
    from zobench.analysis.estimate import estimate_missing
    from zobench.driver import select_cells
    from zobench.spec.pilot import choose, pilot_cells
    from zobench.spec.suite import parse_suite

    suite = parse_suite({"name": "p", "reference": False,
                         "defaults": {"model": "random:tiny-llama", "steps": 50, "lr": 1e-5, "density": 0.01},
                         "matrix": {"seed": [0, 1], "method": ["random", "full"]},
                         "lr_pilot": {"steps": 4, "grids": [{"match": {"method": "random"}, "lr": [1e-4, 1e-3]}]}},
                        "p.yaml")
    cells = select_cells(suite)

    def done(cell, dev=None):
        m = Metrics()
        if dev is not None:
            m.set(best_dev={"accuracy": dev})
        return CellRecord(cell.cell_id, config=cell.config.to_dict(), labels=cell.labels, metrics=m)

    pilots = {p.config.lr: done(p, dev) for p, dev in zip(pilot_cells(cells, suite.lr_pilot), (0.7, 0.8))}
    chosen = [c for c in choose(cells, suite.lr_pilot, list(pilots.values()))[0] if c.config.method == "random"]
    assert {c.config.lr for c in chosen} == {1e-3}
    records = [*pilots.values(), *(done(c) for c in chosen)]
    estimates, lines = estimate_missing(suite, records)
    assert {e.labels["method"] for e in estimates} == {"full"}  # the measured random cells are not estimated
    estimates, lines = estimate_missing(suite, [pilots[1e-4]])  # one pilot of two: the random cells wait
    waiting = [line for line in lines if "method=random" in line]
    assert len(waiting) == 2 and all("its lr pilots have not all run" in line for line in waiting)


def test_a_suite_without_budgets_says_there_is_nothing_to_check(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ndefaults:\n  model: random:tiny-llama\nmatrix:\n  method: [full]\n")
    code, out = _main(capsys, "--suite", str(suite))
    assert code == 0 and out.splitlines() == [f"ok: {suite} declares no budgets; nothing to check for {suite} "
                                               "(no results)"]


def test_a_limit_no_cell_could_meet_or_break_is_refused_naming_it():
    """A percent written where a fraction is read (accuracy_min 85) or a peak of 0 or below: a budget that
    could never hold or never break, refused in one line with what it expects."""
    import pytest

    from zobench.errors import UserError

    for bad, says in (({"accuracy_min": 85}, r"accuracy_min = 85: expected a fraction in \[0, 1\] \(0.85 for 85%\)"),
                      ({"accuracy_drop_max": 2}, r"accuracy_drop_max = 2: expected a fraction in \[-1, 1\]"),
                      ({"peak_mib_max": 0}, "peak_mib_max = 0: expected a number above 0"),
                      ({"peak_over_inference_max": -1.05}, "peak_over_inference_max = -1.05: expected a number above"),
                      ({"step_over_two_forwards_max": 0}, "step_over_two_forwards_max = 0: expected"),
                      ({"latency_tolerance": -0.1}, r"latency_tolerance = -0.1: expected a number >= 0")):
        with pytest.raises(UserError, match=says):
            parse_suite({"name": "s", "budgets": [{"match": {}, **bad}]}, "s.yaml")
    # the edges a real budget may sit on
    for good in ({"accuracy_min": 0}, {"accuracy_min": 1}, {"accuracy_drop_max": -0.05}, {"latency_tolerance": 0}):
        assert parse_suite({"name": "s", "budgets": [{"match": {}, **good}]}, "s.yaml").budgets[0].limits
