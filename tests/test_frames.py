"""A claims suite's verdicts and per-example predictions in pandas (zobench/report/frames.py): the report's
numbers on the report's scale, every declaration, and the predictions read as the verdicts read them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from claims_runs import N, claims, suite_declaring, write_results

from zobench.analysis.verdicts import verdicts
from zobench.cell.measures import Metrics
from zobench.cell.predictions import Predictions
from zobench.cell.record import CellRecord
from zobench.errors import UserError
from zobench.report import frames
from zobench.results import append_record, load_records
from zobench.spec.claims import claims_hash

pytest.importorskip("pandas")


@pytest.fixture()
def results(tmp_path) -> Path:
    return write_results(tmp_path)


def test_the_verdicts_load_in_pandas_as_the_report_prints_them(results, tmp_path):
    decision = verdicts(load_records(results), claims(), results.parent)
    df = frames.claims(results, suite_declaring(tmp_path, margin=0.0))
    assert list(df.declaration) == ["current", "current"]  # nothing declared differently: no earlier rows
    for r in decision.results:
        row = df[df.claim == r.claim].iloc[0]
        assert row.estimate == pytest.approx(100 * r.estimate) and row.p_holm == r.p_adjusted
        assert (row.holm_low, row.holm_high) == pytest.approx((100 * r.adj_low, 100 * r.adj_high))
        assert row.verdict == r.verdict and row.interim  # 12 of the suite's 12 cells have other ids: not in
    assert df.set_index("claim").margin.to_dict() == pytest.approx({"s-beats-r": 0.0, "s-like-f": 5.0})
    for cid, res in decision.resolutions.items():  # what the design resolves, in points (squared for variances)
        row = df[df.claim == cid].iloc[0]
        assert row.seeds_paired == 4 and row.var_run == pytest.approx(1e4 * res.interaction)
        s, e = 4, 600
        var_now = row.var_seed / s + row.var_example / e + row.var_run / (s * e)
        assert var_now == pytest.approx(1e4 * res.variance(4))
        assert row.half_width_any_seeds == pytest.approx(100 * res.half_width(float("inf")))
        assert row.seed_clamped == res.seed_clamped and (row.var_seed == 0) >= row.seed_clamped
    edited = frames.claims(results, suite_declaring(tmp_path, margin=0.30))
    assert sorted(edited.declaration) == ["current", "current", "earlier", "earlier"]
    then = edited[(edited.declaration == "earlier") & (edited.claim == "s-beats-r")].iloc[0]
    assert then.verdict == "holds" and then.claims_hash == claims_hash(claims())


def test_per_example_predictions_load_in_pandas_paired_by_example_and_checked_as_the_verdicts_read_them(results):
    records = load_records(results)
    df = frames.predictions(results)
    assert len(df) == len(records) * N and set(df.evaluation) == {"test_best"}
    # each run's share correct is the accuracy its record states
    by_run = df.groupby("cell_id").correct.mean()
    for rec in records:
        assert by_run[rec.cell_id] == pytest.approx(rec.metrics.accuracy("test_best"))
    assert {c for c in df.columns if c.startswith("score_")} == {"score_0", "score_1"}
    # two arms side by side on the same examples (each file's ids were shuffled)
    paired = df[df.seed == 0].pivot(index="id", columns="method", values="correct")
    assert len(paired) == N and not paired.isna().any().any()
    assert frames.predictions(results, evaluation="test_after").empty  # not kept for these runs
    # a generative task's run: its text predictions and EM / F1 per example, no "correct" to compute
    keep = Predictions(results.parent / "t.predictions" / "gen.npz")
    keep.add("test_after", {"id": np.arange(3), "pred": np.array(["Paris", "", "42"], dtype=np.str_),
                            "em": np.array([1.0, 0.0, 1.0]), "f1": np.array([1.0, 0.0, 1.0])})
    desc = keep.write()
    desc["path"] = str(Path(desc["path"]).relative_to(results.parent))
    gen = results.parent / "gen.jsonl"
    append_record(gen, CellRecord(cell_id="gen", config={"method": "full", "seed": 0, "task": "squad"},
                                  labels={"method": "full"}, metrics=Metrics(), predictions=desc, suite="g"))
    g = frames.predictions(gen)
    assert list(g.pred) == ["Paris", "", "42"] and list(g.em) == [1.0, 0.0, 1.0] and "correct" not in g
    # a record pointing its predictions outside the results folder is refused in one line
    bad = [replace(records[0], predictions=dict(records[0].predictions, path="../elsewhere.npz"))]
    out = results.parent / "bad.jsonl"
    append_record(out, bad[0])
    with pytest.raises(UserError, match="expected a path inside the results folder"):
        frames.predictions(out)
