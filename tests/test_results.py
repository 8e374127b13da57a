"""Results files: appends survive a torn line, bad files give one clear error, old schemas still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zobench.cell.influence_record import InfluenceRecord
from zobench.cell.measures import Metrics, PhaseMeasure, SchemaError, Stats
from zobench.cell.record import CellRecord
from zobench.errors import UserError
from zobench.results import append_record, load_influence, load_records, to_pandas

ROOT = Path(__file__).resolve().parents[1]


def test_a_torn_last_line_is_skipped_on_read_and_cut_on_the_next_append(tmp_path, capsys):
    p = tmp_path / "r.jsonl"
    append_record(p, CellRecord("a", labels={"method": "full"}))
    with open(p, "a") as f:
        f.write('{"cell_id": "b", "sta')  # a writer killed mid-line
    assert [r.cell_id for r in load_records(p)] == ["a"]
    assert "torn last line" in capsys.readouterr().err
    append_record(p, CellRecord("c", labels={"method": "random"}))
    # the fragment never ends up between two whole records, where it would make the file corrupt
    assert [r.cell_id for r in load_records(p)] == ["a", "c"]
    assert len(p.read_text().splitlines()) == 2


def test_a_bad_line_before_the_last_is_corruption(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"cell_id": "a"}\n{"cell_id": "b", "sta\n{"cell_id": "c"}\n')
    with pytest.raises(UserError, match=r"r.jsonl:2: not a JSON record .* corrupt"):
        load_records(p)
    p.write_text('{"cell_id": "a"}\n' + "[" * 40 + "]" * 40 + '\n{"cell_id": "c"}\n')
    deep = r"r.jsonl:2: not a JSON record \(nested deeper than zobench reads \(32 levels\)\)"
    with pytest.raises(UserError, match=deep):
        load_records(p)


def test_pandas_view_latest_record_wins_with_ratios_derived_on_read(tmp_path):
    p = tmp_path / "r.jsonl"
    cfg = {"model": "m", "method": "full"}
    append_record(p, CellRecord("a", status="failed", reason="boom", labels={"method": "full"}, config=cfg))
    m = Metrics()
    m.set(test_after={"accuracy": 0.5}, step_s=Stats(2.0, 1.5, 2.5, 10))
    append_record(p, CellRecord("a", labels={"method": "full"}, config=cfg, metrics=m,
                                phases={"train": PhaseMeasure(wall_s=3.0, peak_rss_mib=120.0)}))
    fwd = Metrics()
    fwd.set(step_s=Stats(0.8, 0.7, 0.9, 10))
    append_record(p, CellRecord("f", labels={"method": "forward"}, config=dict(cfg, method="forward"), metrics=fwd,
                                phases={"train": PhaseMeasure(wall_s=1.0, peak_rss_mib=100.0)}))
    df = to_pandas(p).set_index("cell_id")
    assert len(df) == 2 and df.loc["a", "status"] == "ok"
    assert df.loc["a", "test_after_accuracy"] == 0.5 and df.loc["a", "peak_mib"] == 120.0
    assert df.loc["a", "peak_over_inference"] == pytest.approx(1.2)
    assert df.loc["a", "step_over_two_forwards"] == pytest.approx(1.25) and df.loc["a", "train_wall_s"] == 3.0


def test_not_a_results_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n')
    with pytest.raises(UserError, match="not a zobench record"):
        load_records(p)


def test_a_dev_curve_point_without_its_step_or_with_a_word_for_a_score_is_one_line_naming_it(tmp_path):
    """Reports read every dev point's step and scores (a pilot's best -> last, a cell's run): a results file
    whose points lack one or carry a word refuses to load, naming the line and the field."""
    line = json.loads((ROOT / "results" / "claims-v2.jsonl").read_text().splitlines()[0])
    assert line["metrics"]["dev_curve"]  # a pilot with its curve
    for change, message in ((lambda c: c[0].pop("step"), r"metrics.dev_curve\[0\].step' is missing"),
                            (lambda c: c[1].update(accuracy="high"),
                             r"metrics.dev_curve\[1\].accuracy' = 'high': expected int or float"),
                            (lambda c: c.append(3), r"metrics.dev_curve\[3\]' = 3: expected dict")):
        bad = json.loads(json.dumps(line))
        change(bad["metrics"]["dev_curve"])
        p = tmp_path / "r.jsonl"
        p.write_text(json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=r"r.jsonl:1: field '" + message):
            load_records(p)
    Metrics.from_json(line["metrics"])  # the committed record itself loads


def test_what_reports_read_of_a_record_is_typed_on_load(tmp_path):
    """The fields a report formats or plots as they are (scores, timings' counts, the loss curve, the
    environment line, the learning-rate table) are checked when the record loads: a word, a list or a null
    where a report needs a number is one line naming the field, not a traceback from the table that reads it."""
    line = next(json.loads(t) for t in (ROOT / "results" / "claims-v2.jsonl").read_text().splitlines()
                if json.loads(t).get("lr_choice") and json.loads(t)["metrics"].get("zo_passes"))
    cases = (
        (lambda r: r["metrics"]["test_after"].update(accuracy="x"), "metrics.test_after.accuracy' = 'x'"),
        (lambda r: r["metrics"]["test_before"].update(accuracy=[1]), r"metrics.test_before.accuracy' = \[1\]"),
        (lambda r: r["metrics"]["loss_curve"].append({}), r"metrics.loss_curve\[\d+\]' = {}"),
        (lambda r: r["metrics"].update(segment_machines=["a", 2]), r"metrics.segment_machines\[1\]' = 2"),
        (lambda r: r["metrics"].update(segment_machines="a"), r"metrics.segment_machines' = 'a'"),
        (lambda r: r["metrics"]["step_s"].update(n=None), "metrics.step_s.n' = None: expected a count"),
        (lambda r: r["metrics"]["step_s"].update(p10=None), "metrics.step_s.p10' = None: expected a number"),
        (lambda r: r["metrics"]["zo_passes"].update(pass_gb_s="fast"), "metrics.zo_passes.pass_gb_s' = 'fast'"),
        (lambda r: r["env"].update(versions=["torch"]), "env.versions' = \\['torch'\\]"),
        (lambda r: r["env"].update(cpu_count="2"), "env.cpu_count' = '2'"),
        (lambda r: r["lr_choice"].pop("pilot_steps"), "lr_choice' has no 'pilot_steps'"),
        (lambda r: r["lr_choice"].update(grid="x"), "lr_choice.grid' = 'x'"),
        (lambda r: r["lr_choice"]["dev"].append(0.5), "lr_choice': expected one dev score per lr"),
    )
    for change, message in cases:
        bad = json.loads(json.dumps(line))
        change(bad)
        p = tmp_path / "r.jsonl"
        p.write_text(json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=r"r.jsonl:1: field '" + message) as e:
            load_records(p)
        assert "\n" not in str(e.value)
    bad = json.loads(json.dumps(line))
    bad["metrics"]["step_parts_s"] = None  # null reads as absent
    (tmp_path / "r.jsonl").write_text(json.dumps(bad) + "\n")
    assert load_records(tmp_path / "r.jsonl")[0].metrics.step_parts_s == {}


def test_records_round_trip_through_json():
    rec = load_records(ROOT / "results" / "smollm2-quant.jsonl")[-1]
    again = CellRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert again.to_json() == rec.to_json()


def test_schema_1_records_load_as_schema_2():
    """The suite's first committed run was written by schema 1: phase times under "seconds", frozen "derived"."""
    first_run = ROOT / "results" / "archive" / "smollm2-quant-2026-11-23.jsonl"
    lines = [json.loads(line) for line in first_run.read_text().splitlines()]
    assert {line["schema"] for line in lines} == {1}
    recs = load_records(first_run)
    ok = [(line, r) for line, r in zip(lines, recs) if r.ok]
    assert ok and all(r.schema == 2 for _, r in ok)
    for line, r in ok:
        assert r.phases["train"].wall_s == line["phases"]["train"]["seconds"]
        assert r.metrics.step_s.median == line["metrics"]["step_s"]["median"]
        assert "derived" not in r.to_json()


@pytest.mark.parametrize("name", ["influence.jsonl", "influence-zo.jsonl"])
def test_committed_influence_records_read_typed_and_write_back_unchanged(name):
    """Influence records are typed in the one schema; the committed ones (schema 1 and 2) come back byte for
    byte, so the report reads them as it always did."""
    lines = (ROOT / "results" / name).read_text().splitlines()
    recs = load_influence(ROOT / "results" / name)
    assert len(recs) == len(lines) and {r.schema for r in recs} <= {1, 2}
    for line, rec in zip(lines, recs):
        assert json.dumps(rec.to_json()) == json.dumps(json.loads(line))
        assert rec.sections["quality"]["n"] > 0 and rec.config["model"]


def test_a_mistyped_influence_record_is_one_line_naming_the_field(tmp_path):
    rec = json.loads((ROOT / "results" / "influence-zo.jsonl").read_text().splitlines()[-1])
    for change, message in ((lambda r: r["quality"].update(n="many"), "field 'quality.n'"),
                            (lambda r: r.pop("cost"), "without 'cost'"),
                            (lambda r: r.update(cost=None), "field 'cost' = None: expected dict"),
                            (lambda r: r.update(schema=3), "field 'schema'"),
                            (lambda r: r["quality"]["by_k"][0]["triggered"].update(auroc="high"),
                             "field 'quality.by_k\\[0\\].triggered.auroc' = 'high': expected int or float"),
                            (lambda r: r["zo"]["quality"]["by_k"][1].pop("control"),
                             "field 'zo.quality.by_k\\[1\\].control' = None: expected dict"),
                            (lambda r: r["fidelity"]["sweep"][2].pop("spearman"),
                             "field 'fidelity.sweep\\[2\\]' has no 'spearman'")):
        bad = json.loads(json.dumps(rec))
        change(bad)
        (tmp_path / "r.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=message) as e:
            load_influence(tmp_path / "r.jsonl")
        assert str(e.value).startswith(f"{tmp_path / 'r.jsonl'}:1: ") and "\n" not in str(e.value)
    with pytest.raises(SchemaError, match="not an influence record"):
        InfluenceRecord.from_json({"cell_id": "x"})


def _leaf_paths(value, path=()):
    """Every key path in a JSON value (a list by its first element), depth first."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaf_paths(v, path + (k,))
    elif isinstance(value, list) and value:
        yield from _leaf_paths(value[0], path + (0,))
    if path:
        yield path


def test_an_influence_report_of_a_record_missing_or_mistyping_any_field_is_one_line_and_writes_nothing(tmp_path):
    """The influence report reads its record's free-form results as they are. Every 10th key path of the
    committed record (about 30 of them, a fixed sample), removed or set to a word: the report renders, or it
    is refused in one line naming the results file, and a refused one leaves the earlier report and plots
    as they were (text and plots are made in memory before any is written)."""
    from zobench.report import render_results_file

    rec = json.loads((ROOT / "results" / "influence-zo.jsonl").read_text().splitlines()[-1])
    results, out = tmp_path / "r.jsonl", tmp_path / "rep" / "r.md"
    results.write_text(json.dumps(rec) + "\n")
    render_results_file(results, out)
    before = {p.name: p.read_bytes() for p in [out, *sorted((tmp_path / "rep" / "r_plots").iterdir())]}
    paths = list(_leaf_paths(rec))[::10]
    assert len(paths) >= 25
    refused = 0
    for path in paths:
        for mode in ("remove", "word"):
            bad = json.loads(json.dumps(rec))
            parent = bad
            for k in path[:-1]:
                parent = parent[k]
            if mode == "remove" and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = "x"
            results.write_text(json.dumps(bad) + "\n")
            try:
                render_results_file(results, out)
            except UserError as e:
                refused += 1
                assert str(e).startswith(str(results)) and "\n" not in str(e), (path, mode, str(e))
                now = {p.name: p.read_bytes() for p in [out, *sorted(out.parent.joinpath("r_plots").iterdir())]}
                assert now == before, (path, mode)
                continue
            for name, data in before.items():  # rendered: back to the committed record's report and plots
                (out if name == out.name else out.parent / "r_plots" / name).write_bytes(data)
    assert refused > len(paths) / 2


def test_an_influence_records_fine_tunes_read_as_typed_cells_and_a_mistyped_one_is_located(tmp_path):
    rec = json.loads((ROOT / "results" / "influence-zo.jsonl").read_text().splitlines()[-1])
    lora = CellRecord("lora-cell", config={"method": "lora"}, metrics=Metrics(values={"steps_done": 6}))
    zo = CellRecord("zo-cell", config={"method": "sensitive"})
    rec["finetune"]["cell"], rec["zo"]["train"]["cell"] = lora.to_json(), zo.to_json()
    typed = InfluenceRecord.from_json(rec)
    assert [(arm, c.cell_id, c.metrics.get("steps_done")) for arm, c in typed.fine_tunes()] == \
        [("LoRA", "lora-cell", 6), ("sparse ZO", "zo-cell", None)]
    assert json.dumps(typed.to_json()) == json.dumps(rec)  # written back as read
    rec["zo"]["train"]["cell"]["cell_id"] = 5
    (tmp_path / "r.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(UserError) as e:
        load_influence(tmp_path / "r.jsonl")
    assert str(e.value) == f"{tmp_path / 'r.jsonl'}:1: zo.train.cell: field 'cell_id' = 5: expected str"


def test_step_percentiles_stay_within_the_timings_even_for_a_few_steps():
    """Three timed steps on a GPU gave a negative p10 with the default (exclusive) quantiles."""
    s = Stats.of([0.0492, 0.0591, 0.0018])
    assert 0.0018 <= s.p10 <= s.median <= s.p90 <= 0.0591 and s.n == 3
    one = Stats.of([0.5])
    assert (one.median, one.p10, one.p90) == (0.5, 0.5, 0.5)


def test_the_record_accessors_read_a_value_or_none_where_an_older_or_failed_record_lacks_it():
    """The report reads records through these, never through paths: a field a record lacks (a failed
    cell, an estimate that raised, an older record) reads as None and the report shows "-"."""
    rec = load_records(ROOT / "results" / "gpu" / "smoke-cuda.jsonl")[-1]
    assert rec.estimated_peak_mib == rec.estimate["peak_mib"]
    assert rec.estimated_weights_mib == rec.estimate["breakdown"]["weights_mib"]
    assert rec.estimate_floor == rec.estimate["calibration"]["source"]
    assert rec.phase("train") is rec.phases["train"]
    bare = CellRecord("c", status="failed", estimate={"error": "ValueError: no model"}, artifact={"bytes": 2048})
    assert (bare.estimated_peak_mib, bare.estimated_weights_mib, bare.estimate_floor) == (None, None, None)
    assert bare.artifact_bytes == 2048 and CellRecord("c").artifact_bytes is None
    assert bare.phase("train").other_cpus is None and bare.phase("train").wall_s is None
    assert "train" not in bare.phases  # reading a phase the cell did not run adds none
    m = Metrics()
    m.set(test_after={"em": 0.5, "f1": 0.6}, best_dev={"accuracy": 0.7})
    assert (m.accuracy("test_after"), m.accuracy("best_dev"), m.accuracy("test_before")) == (None, 0.7, None)


def test_a_record_with_a_list_or_mapping_where_a_setting_belongs_is_paired_with_nothing_and_breaks_nothing():
    """Records are data: a seed, ``pack`` or ``malloc`` that is a list or a mapping (or a pilot ``stage`` that
    is one) once made deriving the ratios fail on an unhashable key; such a record now pairs only with the same
    value, and every other cell derives what it derived without it."""
    from zobench.results import derive

    fixture = Path(__file__).parent / "data" / "report_fixture.jsonl"
    clean = load_records(fixture)
    want = {c: d.to_dict() for c, d in derive(clean).items()}
    odd = []
    for i, (key, value) in enumerate([("seed", [1]), ("pack", {"a": 1}), ("malloc", ["glibc"])]):
        r = CellRecord.from_json({**json.loads(json.dumps(clean[3].to_json())), "cell_id": f"odd{i}"})
        r.config[key] = value
        odd.append(r)
    staged = CellRecord.from_json({**json.loads(json.dumps(clean[3].to_json())), "cell_id": "staged"})
    staged.labels["stage"] = ["pilot"]
    got = derive([*clean, *odd, staged])
    assert {c: d.to_dict() for c, d in got.items() if c in want} == want
    for r in odd:  # no forward cell has its odd setting: no ratio against one
        assert got[r.cell_id].peak_over_inference is None
