"""Claims decided from records: arms by selector, per-example predictions read back (checked against their
hash), failed runs left out and listed, both verdicts when a claim changed after the data existed, and the
re-analysis script giving the report's table from the records alone."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from claims_runs import N, claims, run, write_results

from zobench.analysis.design import resolution
from zobench.analysis.stats import align
from zobench.analysis.verdicts import Reader, claims_of, majority_rate, runs, verdicts
from zobench.cell.measures import Metrics, Stats
from zobench.cell.predictions import Predictions
from zobench.cell.record import CellRecord
from zobench.errors import UserError
from zobench.report import render_report
from zobench.report.claims import claims_section
from zobench.results import append_record, load_records
from zobench.spec.claims import _canonical, claims_hash, parse_claims

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def results(tmp_path) -> Path:
    return write_results(tmp_path)


def test_a_clear_difference_holds_and_failed_runs_are_left_out_by_the_declared_rule(results, tmp_path):
    records = load_records(results)
    rng = np.random.default_rng(1)
    broken = run(tmp_path, "random", 9, 0.50, claims(), rng)  # at the majority rate: it did not learn
    decision = verdicts(records + [broken], claims(), results.parent)
    by = {r.claim: r for r in decision.results}
    beats = by["s-beats-r"]
    assert beats.verdict == "holds" and beats.n_seeds == (4, 4) and beats.n_examples == N
    assert 0.10 < beats.estimate < 0.18 and beats.adj_low > 0
    assert any("random-9" in e and "majority" in e for e in decision.excluded)
    assert by["s-like-f"].verdict in ("holds", "not resolved")  # +1 point against a 5-point margin, 4 seeds


@pytest.mark.parametrize("full, expected", [(0.76, "holds"), (0.90, "does not hold")])
def test_non_inferiority_holds_inside_its_margin_and_fails_well_outside_it(tmp_path, full, expected):
    """Sensitive at 80% against full ZO at 76% (4 points better) or 90% (10 points worse, the margin 5)."""
    rng, declared, out = np.random.default_rng(5), claims(), tmp_path / "t.jsonl"
    for seed in range(4):
        for method, acc in (("sensitive", 0.80), ("random", 0.66), ("full", full)):
            append_record(out, run(tmp_path, method, seed, acc, declared, rng))
    like = {r.claim: r for r in verdicts(load_records(out), declared, tmp_path).results}["s-like-f"]
    assert like.verdict == expected and like.estimate == pytest.approx(0.80 - full, abs=0.04)


def test_one_seed_per_arm_reports_its_interval_but_decides_nothing(tmp_path):
    """A clear difference on one seed a side is an interval about those two runs (examples only), not a
    verdict about the methods: not resolved, and said why; with more seeds a side it holds."""
    rng = np.random.default_rng(3)
    declared = claims()
    out = tmp_path / "t.jsonl"
    for method, acc in (("sensitive", 0.85), ("random", 0.62), ("full", 0.84)):
        append_record(out, run(tmp_path, method, 0, acc, declared, rng))
    one = {r.claim: r for r in verdicts(load_records(out), declared, tmp_path).results}["s-beats-r"]
    assert one.n_seeds == (1, 1) and one.adj_low > 0.1  # the interval alone would say it holds
    assert one.verdict == "not resolved" and "at least 2 seeds per arm" in one.method
    for seed in (1, 2, 3):
        for method, acc in (("sensitive", 0.85), ("random", 0.62)):
            append_record(out, run(tmp_path, method, seed, acc, declared, rng))
    more = {r.claim: r for r in verdicts(load_records(out), declared, tmp_path).results}["s-beats-r"]
    assert more.n_seeds == (4, 4) and more.verdict == "holds"


def test_predictions_that_are_not_the_recorded_bytes_are_refused(results):
    records = load_records(results)
    victim = results.parent / records[0].predictions["path"]
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(UserError, match="sha256"):
        verdicts(records, claims(), results.parent)


def _npz(path: Path, arrays: dict) -> dict:
    """A predictions file of ``arrays`` at ``path``, and the record's description of it."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    return {"path": path.name, "sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "evaluations": ["test_best"]}


def _huge_header(path: Path) -> dict:
    """A 200-byte .npz whose one array declares 32 GB."""
    import io
    import zipfile

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f8", "fortran_order": False, "shape": (4 * 10**9,)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("test_best.gold.npy", head.getvalue() + bytes(16))
    data = path.read_bytes()
    return {"path": path.name, "sha256": hashlib.sha256(data).hexdigest(), "evaluations": ["test_best"]}


def test_a_record_cannot_point_the_verdicts_at_any_file_or_feed_them_malformed_arrays(results):
    """Each hostile description or file costs one line (exit 2 in the report), never a traceback, a hang on
    a pipe, an unbounded read or a huge allocation."""
    records = load_records(results)
    folder, good = results.parent, records[0].predictions
    os.mkfifo(folder / "pipe.npz")
    n = 600
    cases = {
        "predictions.path: expected a path inside": dict(good, path="/etc/hostname"),
        "predictions.path: expected a path inside ": dict(good, path="../" + good["path"]),
        "predictions.sha256: expected": {k: v for k, v in good.items() if k != "sha256"},
        "predictions.evaluations: expected a list": dict(good, evaluations="xx_test_best"),
        "not a regular file": dict(good, path="pipe.npz"),
        "declares 32,000,000,000 bytes": _huge_header(folder / "huge.npz"),
        "gold must hold class indices": _npz(folder / "floats.npz", {
            "test_best.id": np.arange(n), "test_best.gold": np.zeros(n), "test_best.pred": np.zeros(n, int)}),
        "one value per example": _npz(folder / "short.npz", {
            "test_best.id": np.arange(n), "test_best.gold": np.zeros(n - 1, int), "test_best.pred": np.zeros(n, int)}),
        "needs its id, gold and pred": _npz(folder / "nogold.npz", {
            "test_best.id": np.arange(n), "test_best.pred": np.zeros(n, int)}),
    }
    # a gold label of 10**12 is a class index like any other: its majority rate costs no 7 TiB of bins
    huge_gold = np.zeros(n, dtype=np.int64)
    huge_gold[::2] = 10**12
    assert majority_rate({"gold": huge_gold}) == 0.5
    for needle, desc in cases.items():
        bad = [replace(records[0], predictions=desc)] + records[1:]
        with pytest.raises(UserError, match=re.escape(needle.strip())) as e:
            verdicts(bad, claims(), folder)
        assert "\n" not in str(e.value), needle
    odd_seed = [replace(records[0], config=dict(records[0].config, seed="zero"))] + records[1:]
    with pytest.raises(UserError, match="config.seed: expected a whole number"):
        verdicts(odd_seed, claims(), folder)
    # a test score that is not a number is no score: that run is failed and left out, the rest decided
    m = copy.deepcopy(records[0].metrics)
    m.set(test_best={"accuracy": "0.8"}, test_after={"accuracy": "0.8"})
    decision = verdicts([replace(records[0], metrics=m)] + records[1:], claims(), folder)
    assert any(records[0].cell_id in e and "no test accuracy" in e for e in decision.excluded)


def test_a_claim_changed_after_the_data_keeps_both_verdicts_labelled(results, tmp_path):
    records = load_records(results)
    now = claims(margin=0.30)  # edited afterwards: now it asks for 30 points
    decision = verdicts(records, now, results.parent)
    assert decision.claims_hash != claims_hash(claims())
    assert {r.claim: r.verdict for r in decision.results}["s-beats-r"] == "does not hold"
    (earlier,) = decision.earlier.values()
    assert {r.claim: r.verdict for r in earlier}["s-beats-r"] == "holds"


def test_the_report_and_the_reanalysis_script_give_the_same_table(results, tmp_path):
    report = render_report(load_records(results), tmp_path / "rep" / "t.md", results_dir=results.parent)
    text = report.read_text()
    assert "## Claims" in text and "**holds**" in text and "sensitive beats random" in text
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "reanalyze_claims.py"), str(results)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert table and all(line in text for line in table)


def test_records_without_predictions_are_listed_not_decided(tmp_path):
    m = Metrics()
    m.set(test_best={"accuracy": 0.8}, loss_curve=[0.7] * 20)
    recs = [CellRecord(cell_id=f"{meth}{s}", config={"method": meth, "seed": s}, labels={"method": meth}, metrics=m)
            for meth in ("sensitive", "random", "full") for s in range(2)]
    decision = verdicts(recs, claims(), tmp_path)
    assert all(r.verdict == "not resolved" for r in decision.results)
    assert sum("no per-example predictions" in e for e in decision.excluded) == 8  # 2 seeds x 2 arms x 2 claims


def test_an_arm_matching_two_runs_of_one_seed_is_not_decided_and_says_why(results, tmp_path):
    """Two runs of one seed in an arm (a selector that does not pin quant, say) would leave one of them out
    silently: the claim is left undecided instead, naming both runs."""
    records = load_records(results)
    twin = run(tmp_path, "random", 0, 0.66, claims(), np.random.default_rng(5), cell="random-0-nf4")
    twin.config = {**twin.config, "quant": "nf4"}
    decision = verdicts(records + [twin], claims(), results.parent)
    beats = {r.claim: r for r in decision.results}["s-beats-r"]
    assert beats.verdict == "not resolved" and "two runs of seed 0" in beats.method
    assert any("random-0-nf4" in e for e in decision.excluded)


def speed_claims(clock: str) -> list:
    return parse_claims({"alpha": 0.05, "resamples": 2000, "seed": 0,
                         "failed_if": {"accuracy_at_most_majority_plus": 0.02},
                         "items": [{"id": "faster", "kind": "faster_to_target", "a": {"method": "sensitive"},
                                    "b": {"method": "full"}, "target": "b_best", "clock": clock}]}, "t.yaml")


def timed(rec: CellRecord, reach: int, ratio: float, forward_s: float, load) -> CellRecord:
    """``rec`` with a dev curve that reaches its best (0.8) at step ``reach``, steps of ``ratio`` times two
    forwards of ``forward_s``, and training seconds stretched by ``load(step)`` (other work on the machine)."""
    points, seconds = [], 0.0
    for step in range(100, 1001, 100):
        seconds += sum(load(s) * ratio * 2 * forward_s for s in range(step - 99, step + 1))
        points.append({"step": step, "accuracy": 0.8 if step >= reach else 0.6 + 0.1 * step / reach,
                       "train_s": seconds})
    rec.metrics.set(dev_curve=points, step_over_ref=Stats(ratio, ratio, ratio, 99),
                    forward_ref_s=Stats(forward_s, forward_s, forward_s, 99))
    return rec


def test_the_step_forwards_clock_is_the_same_under_load_and_the_others_are_not(tmp_path):
    """a reaches b's best in 300 steps of 1.0 two-forwards where b takes 600 of 1.1: 2.2x, in step_forwards
    whatever load a ran under. A load that slowed a's first 200 steps 5x moves train_s and reference_forwards
    (those seconds over the median forward, which the spike does not move) and leaves step_forwards alone."""
    rng = np.random.default_rng(2)
    records = {}
    for spike in (1.0, 5.0):
        folder = tmp_path / str(spike)
        records[spike] = [timed(run(folder, "sensitive", s, 0.8, [], rng), 300, 1.0, 0.5,
                                lambda step, k=spike: k if step <= 200 else 1.0) for s in range(3)]
        records[spike] += [timed(run(folder, "full", s, 0.8, [], rng), 600, 1.1, 0.5, lambda step: 1.0)
                           for s in range(3)]
    est = {(clock, spike): verdicts(records[spike], speed_claims(clock), tmp_path / str(spike)).results[0].estimate
           for clock in ("step_forwards", "train_s", "reference_forwards") for spike in (1.0, 5.0)}
    assert est[("step_forwards", 1.0)] == est[("step_forwards", 5.0)] == pytest.approx(np.log(2.2))
    assert est[("train_s", 1.0)] == pytest.approx(np.log(2.2))  # an idle machine: seconds agree
    assert est[("reference_forwards", 5.0)] < est[("reference_forwards", 1.0)] - 0.5  # the spike counted as a's


def test_the_speed_claim_leaves_out_runs_at_their_own_test_sets_majority_rate(tmp_path):
    """The failed-run rule reads the majority rate of the run's own test set (here 70%), for the speed claim
    as for the accuracy claims: a run at 71% did not learn, although it is 21 points above a coin's 50%."""
    rng = np.random.default_rng(4)
    recs = [timed(run(tmp_path, m, s, 0.85, [], rng), 300, 1.0, 0.5, lambda step: 1.0)
            for m in ("sensitive", "full") for s in range(3)]
    skewed = run(tmp_path, "full", 7, 0.5, [], rng)
    gold = np.r_[np.ones(420, int), np.zeros(N - 420, int)]  # 70% one class
    keep = Predictions(tmp_path / "t.predictions" / "skewed.npz")
    keep.add("test_best", {"id": np.arange(N), "gold": gold, "pred": np.ones(N, int), "scores": np.zeros((N, 2))})
    desc = keep.write()
    skewed.predictions = {**desc, "path": str(Path(desc["path"]).relative_to(tmp_path))}
    skewed.metrics.set(test_best={"accuracy": 0.71})
    decision = verdicts(recs + [timed(skewed, 300, 1.0, 0.5, lambda step: 1.0)], speed_claims("step_forwards"),
                        tmp_path)
    assert any("full-7" in e and "majority rate 70.0%" in e for e in decision.excluded), decision.excluded


def test_a_suite_that_counts_failed_runs_keeps_them_in_their_arm_and_lists_them(results, tmp_path):
    """With failed_if.count_in_arm a run at the majority rate stays in its arm at what it measured (and is
    listed as failed): random's mean drops, so sensitive's lead over it grows; without it the run is left out.
    The option hashes only when set, so a declaration from before it existed keeps its hash."""
    counting = parse_claims({"alpha": 0.05, "resamples": 2000, "seed": 0,
                             "failed_if": {"accuracy_at_most_majority_plus": 0.02, "count_in_arm": True},
                             "items": [{"id": "s-beats-r", "kind": "superiority", "a": {"method": "sensitive"},
                                        "b": {"method": "random"}, "metric": "test_best", "margin": 0.0}]}, "t.yaml")
    broken = run(tmp_path, "random", 9, 0.50, counting, np.random.default_rng(1))
    records = load_records(results) + [broken]
    kept = verdicts(records, counting, results.parent)
    left = verdicts(records, claims(), results.parent)
    by_kept, by_left = kept.results[0], {r.claim: r for r in left.results}["s-beats-r"]
    assert by_kept.n_seeds == (4, 5) and by_left.n_seeds == (4, 4)
    assert by_kept.estimate > by_left.estimate + 0.02  # a 50% run among four at ~66%
    assert any("random-9" in e and "majority" in e for e in kept.counted) and not kept.excluded
    assert not left.counted and any("random-9" in e for e in left.excluded)
    # Two claims sharing the failed run's arm: the report says the run once, under both claims.
    both = parse_claims({"alpha": 0.05, "resamples": 2000, "seed": 0,
                         "failed_if": {"accuracy_at_most_majority_plus": 0.02, "count_in_arm": True},
                         "items": [{"id": f"{m}-vs-r", "kind": "superiority", "a": {"method": m},
                                    "b": {"method": "random"}, "metric": "test_best", "margin": 0.0}
                                   for m in ("sensitive", "full")]}, "t.yaml")
    listed = [line for line in claims_section(verdicts(records, both, results.parent), {}, []) if "random-9" in line]
    assert len(listed) == 1 and "sensitive-vs-r, arm b; full-vs-r, arm b" in listed[0], listed
    for c in claims():  # hashed as before the option existed: its asdict without the key
        before = asdict(c)
        del before["failed_if"]["count_in_arm"]
        assert c.hash == hashlib.sha256(json.dumps(_canonical(before), sort_keys=True, separators=(",", ":"),
                                                   default=str).encode()).hexdigest()
    assert counting[0].hash != replace(counting[0], failed_if=replace(counting[0].failed_if,
                                                                      count_in_arm=False)).hash


def test_a_declaration_in_a_record_is_validated_like_a_suites(results):
    """Records carry the claims their suite declared; a results file is data, so a declaration zobench did not
    write (an unknown key, a mistyped option) is refused in one line naming the record, and one it wrote
    reads back as the same claims."""
    rec = load_records(results)[0]
    assert claims_hash(claims_of(rec)) == claims_hash(claims())
    for key, value, message in (("bogus", 1, "unknown key 'bogus'"),
                                ("count_in_arm", "yes", "count_in_arm: expected true or false")):
        bad = copy.deepcopy(rec)
        bad.claims["declared"][0]["failed_if"][key] = value
        with pytest.raises(UserError) as e:
            claims_of(bad)
        assert f"record {rec.cell_id}: claims.declared" in str(e.value) and message in str(e.value)
        assert "\n" not in str(e.value)
    for value in ([1], "x", 5):
        bad = copy.deepcopy(rec)
        bad.claims["declared"][0]["failed_if"] = value
        with pytest.raises(UserError, match="failed_if: expected a mapping"):
            claims_of(bad)


def test_earlier_declarations_are_decided_up_to_a_bound_and_the_rest_named(tmp_path):
    """Every record may carry its own declaration (a results file is data): the report decides the first
    MAX_EARLIER of them again and names the others, so its cost stays linear in the records."""
    from zobench.analysis.verdicts import MAX_EARLIER
    from zobench.report.claims import claims_section

    rng, out = np.random.default_rng(9), tmp_path / "t.jsonl"
    for i in range(MAX_EARLIER + 2):
        declared = claims(resamples=2000 + i)
        for method, acc in (("sensitive", 0.8), ("random", 0.66), ("full", 0.79)):
            append_record(out, run(tmp_path, method, i, acc, declared, rng))
    decision = verdicts(load_records(out), claims(resamples=3000), tmp_path)
    assert len(decision.earlier) == MAX_EARLIER and len(decision.earlier_undecided) == 2
    assert set(decision.earlier).isdisjoint(decision.earlier_undecided)
    text = "\n".join(claims_section(decision, {}, []))
    assert text.count("### As declared earlier") == MAX_EARLIER and "2 more earlier declarations" in text


def test_verdicts_of_a_suite_not_all_in_are_marked_interim(results):
    """Verdicts read while declared cells are still missing are labelled interim, each of them, with why;
    once every cell is in, none is."""
    from zobench.report.claims import claims_section

    decision = verdicts(load_records(results), claims(), results.parent)
    partial = "\n".join(claims_section(decision, {}, [], missing=3))
    assert "**Interim:** 3 of the suite's cells have no record yet" in partial
    rows = [line for line in partial.splitlines() if line.startswith("| s-") and "**" in line]  # verdict rows
    assert len(rows) == 2 and all("(interim)" in row for row in rows)
    assert "interim" not in "\n".join(claims_section(decision, {}, [], missing=0)).lower()
    # the suite's file could not be read: no one can tell how many cells are missing, and every verdict says so
    unknown = "\n".join(claims_section(decision, {}, [], missing=None))
    rows = [line for line in unknown.splitlines() if line.startswith("| s-") and "**" in line]
    assert "**Not known to be final:**" in unknown and len(rows) == 2 and all("(suite not read)" in r for r in rows)


def test_the_report_says_what_the_design_resolves_from_the_claims_own_runs(results, tmp_path):
    records = load_records(results)
    decision = verdicts(records, claims(), results.parent)
    assert set(decision.resolutions) == {"s-beats-r", "s-like-f"}  # both accuracy claims, 4 seeds paired
    # the arms read straight from the predictions files, as the fixture wrote them (every run counts)
    reader, claim = Reader(results.parent), claims()[0]
    arms = []
    for selector in (claim.a, claim.b):
        arm = {}
        for rec in runs(records, selector):
            d = reader.evaluation(rec, "test_best")
            arm[rec.config["seed"]] = align(np.sort(d["id"]), d["id"], d["pred"] == d["gold"])
        arms.append(arm)
    res = resolution(*arms)
    assert decision.resolutions["s-beats-r"] == res and res.n_seeds == 4 and res.n_examples == 600
    # the fixture's runs are independent draws: no seed effect beyond each run's own noise, so the floor (any
    # number of seeds) is the test examples' share alone and far under the interval now
    assert res.half_width(math.inf) < 0.5 * res.half_width(4)
    text = render_report(records, tmp_path / "rep" / "t.md", results_dir=results.parent).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| sensitive beats random | 4 x 600 |"))
    now, twice, floor = (float(c) for c in row.strip("| ").split(" | ")[-3:])
    assert (now, twice, floor) == tuple(round(100 * res.half_width(n), 1) for n in (4, 8, math.inf))
    assert ("(seeds: at or below 0)" in row) == res.seed_clamped  # a seed component taken as 0 says so
