"""A claims suite's verdicts and its runs' per-example predictions as pandas DataFrames, for analyses of one's own.

    from zobench.report import frames
    v = frames.claims("results/claims-v2.jsonl", "suites/claims-v2.yaml")   # a row a claim and declaration
    p = frames.predictions("results/claims-v2.jsonl", evaluation="test_best")  # a row a run and example

``claims`` is the report's Claims table (the same ``analysis.verdicts`` decision), as numbers: accuracy
differences in points, speed claims as the ratio of b's time to a's, the margin on the same scale,
``interim`` where declared cells have no record yet, and for the current declaration's accuracy claims what
the design resolves (``var_seed``, ``var_example``, ``var_run``, ``half_width_any_seeds``, ``seed_clamped``:
``_resolution``).
``predictions`` reads each run's ``.npz`` as the verdicts do (inside the results folder, checked against the
sha256 its record names; a file is data) and pairs runs on ``id``: pivot it on ``id`` to compare two arms
example by example.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from zobench.analysis.design import Resolution
from zobench.analysis.stats import Result
from zobench.analysis.verdicts import Reader, verdicts
from zobench.errors import UserError
from zobench.gates.pandas import concat_columns, data_frame
from zobench.report.claims import on_report_scale
from zobench.report.header import cells_without_record
from zobench.results import latest_by_cell, load_records
from zobench.spec.suite import load_suite

# The run's settings each predictions row carries (a matrix label, else the resolved config value)
RUN_KEYS = ("method", "quant", "density", "lr", "seed")


def _row(r: Result, names: dict[str, str], declaration: str, claims_hash: str, interim: bool) -> dict:
    # as the report's margin column reads it: a non-inferiority or equivalence margin as its size
    margin = on_report_scale(r.margin if r.kind in ("superiority", "faster_to_target") else abs(r.margin), r.kind)
    return {"declaration": declaration, "claims_hash": claims_hash, "claim": r.claim,
            "name": names.get(r.claim, r.claim), "kind": r.kind,
            "unit": "time ratio b/a" if r.kind == "faster_to_target" else "points",
            "estimate": on_report_scale(r.estimate, r.kind), "ci_low": on_report_scale(r.ci_low, r.kind),
            "ci_high": on_report_scale(r.ci_high, r.kind), "alpha": r.alpha,
            "holm_low": on_report_scale(r.adj_low, r.kind), "holm_high": on_report_scale(r.adj_high, r.kind),
            "holm_level": 1 - r.alpha_adjusted, "margin": margin, "p": r.p_value, "p_holm": r.p_adjusted,
            "verdict": r.verdict, "interim": interim, "seeds_a": r.n_seeds[0], "seeds_b": r.n_seeds[1],
            "examples": r.n_examples, "method": r.method}


def _resolution(res: Resolution | None, alpha: float) -> dict:
    """What the design resolves (``analysis.design.Resolution``), in points: the variance of the difference
    split into seeds, test examples and each run's noise on each example (points squared, as the components;
    the variance of the mean at S seeds and E examples is var_seed / S + var_example / E + var_run / (S E)),
    and the interval's expected half-width with any number of seeds on this test set; ``seed_clamped``: the
    seed component's estimate came out at or below 0 and var_seed is that 0."""
    if res is None:
        return {k: None for k in ("seeds_paired", "var_seed", "var_example", "var_run", "half_width_any_seeds",
                                  "seed_clamped")}
    return {"seeds_paired": res.n_seeds, "var_seed": 1e4 * res.seed, "var_example": 1e4 * res.example,
            "var_run": 1e4 * res.interaction, "half_width_any_seeds": 100 * res.half_width(math.inf, alpha=alpha),
            "seed_clamped": res.seed_clamped}


def claims(results: str | Path, suite_file: str | Path):
    """Every declared claim's verdict, a row each (``declaration`` "current"), then each earlier declaration's
    verdicts on the same records ("earlier", with its ``claims_hash``), as the report shows them."""
    records, suite = load_records(results), load_suite(suite_file)
    decision = verdicts(records, suite.claims, Path(results).parent)
    if decision is None:
        raise UserError(f"{suite_file}: suite '{suite.name}' declares no claims")
    interim = cells_without_record(suite, records) > 0
    names = {c.id: c.name for c in suite.claims}
    rows = [_row(r, names, "current", decision.claims_hash, interim) | _resolution(decision.resolutions.get(r.claim),
                                                                               r.alpha)
            for r in decision.results]
    for h, results_then in decision.earlier.items():
        rows += [_row(r, names, "earlier", h, interim) for r in results_then]
    return data_frame(rows)


def predictions(results: str | Path, evaluation: str | None = None):
    """A row per run and example of every evaluation kept beside the records (or only ``evaluation``:
    ``test_best``, ``test_after``, ``test_before``, ``dev_<step>``): the run (cell id, stage, RUN_KEYS), the
    evaluation, and the example's fields (``id``, ``gold``, ``pred``, ``correct`` where gold and pred are
    both there; ``em`` and ``f1`` for generation; per-option ``scores`` as ``score_0``, ``score_1``, ...).
    Each run's latest record counts; pilots are in, their ``stage`` "pilot"."""
    reader = Reader(Path(results).parent)
    frames = []
    for rec in latest_by_cell(load_records(results)):
        names = (rec.predictions or {}).get("evaluations") or []
        run = {"cell_id": rec.cell_id, "stage": rec.labels.get("stage", "cell"),
               **{k: rec.labels.get(k, rec.config.get(k)) for k in RUN_KEYS}}
        for name in names if evaluation is None else [evaluation]:
            fields = reader.fields(rec, name) if isinstance(name, str) else None
            if fields:
                frames.append(_examples(run, name, fields, f"record {rec.cell_id}: predictions {name}"))
    return concat_columns(frames)


def _examples(run: dict, name: str, fields: dict, where: str) -> dict[str, list]:
    """One run's evaluation as columns: the run's settings repeated, then each one-value-per-example field."""
    if "id" not in fields or np.asarray(fields["id"]).ndim != 1:
        raise UserError(f"{where}: expected an id array, one value per example")
    n = len(fields["id"])
    cols: dict[str, list] = {}
    for key, arr in fields.items():
        arr = np.asarray(arr)
        if arr.ndim == 0 or len(arr) != n:
            got = "a single value" if arr.ndim == 0 else f"{len(arr)} values"
            raise UserError(f"{where}: {key} has {got} for {n} examples")
        if arr.ndim == 2 and key == "scores":
            cols.update({f"score_{j}": arr[:, j].tolist() for j in range(arr.shape[1])})
        elif arr.ndim == 1:
            cols[key] = arr.tolist()
    if "gold" in cols and "pred" in cols:
        cols["correct"] = [g == p for g, p in zip(cols["gold"], cols["pred"])]
    return {**{k: [v] * n for k, v in run.items()}, "evaluation": [name] * n, **cols}
