"""The learning-rate pilot: chosen on dev (never on test), recorded, and re-derived on --resume."""

from __future__ import annotations

import pytest

from zobench.cell.measures import Metrics
from zobench.cell.record import CellRecord
from zobench.report.header import suite_progress
from zobench.spec.pilot import STAGE, choose, pilot_cells
from zobench.spec.suite import parse_suite

SUITE = {"name": "p", "reference": False,
         "defaults": {"model": "random:tiny-llama", "steps": 50, "lr": 1e-5, "density": 0.01},
         "matrix": {"seed": [0, 1], "method": ["random", "full"]},
         "lr_pilot": {"steps": 4, "grids": [{"match": {"method": "random"}, "lr": [1e-4, 3e-4, 1e-3]}]}}


def _done(cell, dev: float | None):
    m = Metrics()
    if dev is not None:
        m.set(best_dev={"accuracy": dev})
    return CellRecord(cell.cell_id, config=cell.config.to_dict(), labels=cell.labels, metrics=m)


def test_pilots_run_short_on_dev_at_seed_0_and_the_best_dev_lr_wins():
    from zobench.driver import select_cells

    suite = parse_suite(SUITE, "p.yaml")
    cells = select_cells(suite)
    pilots = pilot_cells(cells, suite.lr_pilot)
    # one pilot per lr of the grid, shared by both seeds; full ZO has no grid here and is not piloted
    assert sorted(p.config.lr for p in pilots) == [1e-4, 3e-4, 1e-3]
    assert all(p.config.steps == 4 and p.config.seed == 0 and not p.config.eval_after and
               p.labels["stage"] == STAGE for p in pilots)
    by_lr = {p.config.lr: p for p in pilots}
    records = [_done(by_lr[1e-4], 0.70), _done(by_lr[3e-4], 0.75), _done(by_lr[1e-3], 0.75)]
    chosen, choices = choose(cells, suite.lr_pilot, records)
    rnd = [c for c in chosen if c.config.method == "random"]
    assert {c.config.lr for c in rnd} == {3e-4}  # best dev; of the tied 3e-4 and 1e-3, the smaller
    assert {c.config.seed for c in rnd} == {0, 1}
    for c in rnd:
        assert choices[c.cell_id] == {"grid": [1e-4, 3e-4, 1e-3], "dev": [0.70, 0.75, 0.75], "pilot_steps": 4,
                                      "by": "best dev score", "chosen": 3e-4}
    assert {c.config.lr for c in chosen if c.config.method == "full"} == {1e-5}  # untouched
    # The same records in another order choose the same: --resume re-derives the choice
    again, _ = choose(cells, suite.lr_pilot, list(reversed(records)))
    assert [c.cell_id for c in again] == [c.cell_id for c in chosen]


def test_a_cell_waits_until_every_pilot_of_its_grid_has_a_dev_score():
    """Choosing from the pilots that finished would run a cell at an lr that the failed pilot, re-run by
    --resume, could change: the same seed would get a second cell under another id. So the cell waits, and
    its choice says why; cells without a grid run as configured."""
    from zobench.driver import select_cells

    suite = parse_suite(SUITE, "p.yaml")
    cells = select_cells(suite)
    by_lr = {p.config.lr: p for p in pilot_cells(cells, suite.lr_pilot)}
    for records in ([], [_done(by_lr[1e-4], 0.70), _done(by_lr[3e-4], 0.75)]):
        chosen, choices = choose(cells, suite.lr_pilot, records)
        assert not [c for c in chosen if c.config.method == "random"]
        assert {c.config.method for c in chosen} == {"full"}
        waits = [c for c in choices.values() if c["chosen"] is None]
        assert waits and all(c["note"] == f"waits: {3 - len(records)} of 3 pilots have no dev score" for c in waits)
    # a report of the pilots so far counts the waiting cells among those without a record, out of all of them
    progress = suite_progress(suite, records, "p.yaml")[0]
    assert f"{len(cells)} of the suite's {len(cells)} cells have no record" in progress, progress


def test_while_the_pilots_run_the_cells_stage_to_come_is_counted_without_the_cells_already_recorded(tmp_path):
    """The progress lines of a long run say what the cells stage after the pilots holds (cells and steps); on
    --resume a cell whose pilots chose its lr and that has a record is not counted again."""
    from zobench.driver import Batch, select_cells
    from zobench.results import append_record

    suite = parse_suite(SUITE, "p.yaml")
    cells = select_cells(suite)  # 2 seeds x (random, full), 50 steps each
    out = tmp_path / "p.jsonl"
    by_lr = {p.config.lr: p for p in pilot_cells(cells, suite.lr_pilot)}
    for lr, dev in ((1e-4, 0.70), (3e-4, 0.75), (1e-3, 0.6)):
        append_record(out, _done(by_lr[lr], dev))
    chosen, _ = choose(cells, suite.lr_pilot, [])  # full ZO has no grid: its cells are chosen as they are
    append_record(out, _done(chosen[0], None))

    def batch(resume):
        return Batch(suite, out, {}, {}, resume, lambda *a: None, None)

    # a fresh run runs them all; the steps by method family give each its pace (all ZO here)
    assert batch(False).after_pilots(cells) == {"cells": 4, "steps": 200, "families": {"zo": 200}}
    assert batch(True).after_pilots(cells) == {"cells": 3, "steps": 150, "families": {"zo": 150}}
    rnd, _ = choose(cells, suite.lr_pilot, [_done(by_lr[lr], d) for lr, d in ((1e-4, .7), (3e-4, .75), (1e-3, .6))])
    append_record(out, _done(next(c for c in rnd if c.config.method == "random"), None))
    assert batch(True).after_pilots(cells) == {"cells": 2, "steps": 100, "families": {"zo": 100}}


def test_a_results_file_cannot_steer_the_choice_with_scores_that_are_not_numbers_or_a_late_failure():
    """A pilot's dev score that is not a finite number is no score (the cells wait, nothing crashes); a
    failed record after a pilot's ok one does not hold its cells back (--resume counts it done)."""
    from zobench.driver import select_cells

    suite = parse_suite(SUITE, "p.yaml")
    cells = select_cells(suite)
    by_lr = {p.config.lr: p for p in pilot_cells(cells, suite.lr_pilot)}
    good = [_done(by_lr[1e-4], 0.70), _done(by_lr[3e-4], 0.75)]
    for bad in ("0.9", [0.9], {"a": 1}, True, float("inf")):
        rec = _done(by_lr[1e-3], None)
        rec.metrics.set(best_dev={"accuracy": bad})
        chosen, choices = choose(cells, suite.lr_pilot, good + [rec])
        assert {c.config.method for c in chosen} == {"full"}, bad  # the random cells wait
    later_failure = _done(by_lr[1e-3], 0.72)
    later_failure.status = "failed"
    chosen, _ = choose(cells, suite.lr_pilot, good + [_done(by_lr[1e-3], 0.72), later_failure])
    assert {c.config.lr for c in chosen if c.config.method == "random"} == {3e-4}


def test_pilot_settings_apply_to_the_pilots_only_and_keep_their_ids():
    """``lr_pilot.set``: a setting the cells gained after their pilots ran (packing) stays off the pilots,
    so their ids, and finished records, still count; bad settings are refused by key."""
    from zobench.driver import select_cells
    from zobench.errors import UserError

    before = parse_suite(SUITE, "p.yaml")
    later = dict(SUITE, defaults=dict(SUITE["defaults"], pack=True),
                 lr_pilot=dict(SUITE["lr_pilot"], set={"pack": False}))
    after = parse_suite(later, "p.yaml")
    old, new = (pilot_cells(select_cells(s), s.lr_pilot) for s in (before, after))
    assert [p.cell_id for p in new] == [p.cell_id for p in old] and not any(p.config.pack for p in new)
    cells = select_cells(after)
    assert all(c.config.pack for c in cells)
    assert {c.cell_id for c in cells}.isdisjoint(c.cell_id for c in select_cells(before))  # cells: new ids
    chosen, _ = choose(cells, after.lr_pilot, [_done(p, 0.7) for p in old])
    assert {c.config.lr for c in chosen if c.config.method == "random"} == {1e-4}  # the old pilots decide
    assert all(c.config.pack for c in chosen)
    for bad, says in [({"lr": 1e-3}, "lr_pilot.set.lr: the pilot sets lr itself"),
                      ({"pakc": False}, "lr_pilot.set: unknown key 'pakc'"),
                      ({"pack": "sometimes"}, "pack")]:
        with pytest.raises(UserError, match=says):
            parse_suite(dict(SUITE, lr_pilot=dict(SUITE["lr_pilot"], set=bad)), "p.yaml")


def test_a_suite_with_a_pilot_runs_it_first_and_never_touches_test(tmp_path):
    from zobench.driver import run_suite
    from zobench.executors.pool import PoolExecutor
    from zobench.results import load_records

    suite = parse_suite({"name": "pilot", "reference": False,
                         "defaults": {"model": "smollm2", "method": "random", "density": 1e-3, "n_train": 32,
                                      "n_dev": 8, "n_test": 8, "batch_size": 4, "max_length": 64, "steps": 2,
                                      "warmup_steps": 1, "eval_every": 2, "eval_before": False},
                         "lr_pilot": {"steps": 2, "grids": [{"match": {}, "lr": [1e-4, 1e-3]}]}}, "pilot.yaml")
    # two cells at a time (the two pilots side by side), each in its own process; the cell waits for both
    records = load_records(run_suite(suite, tmp_path, executor=PoolExecutor(jobs=2)))
    pilots = [r for r in records if r.labels.get("stage") == STAGE]
    (main,) = [r for r in records if r.labels.get("stage") is None]
    assert len(pilots) == 2 and records.index(main) == 2  # pilots first
    assert all(r.metrics.get("best_dev") is not None and r.metrics.get("test_after") is None
               and "eval_after" not in r.phases for r in pilots)
    # the lr of the pilot with the best dev score (a tie goes to the smaller lr), read from the pilots' records
    best = max(pilots, key=lambda r: (r.metrics.get("best_dev")["accuracy"], -r.config["lr"]))
    assert main.lr_choice["chosen"] == main.config["lr"] == best.config["lr"]
    assert main.lr_choice["dev"] == [next(r.metrics.get("best_dev")["accuracy"] for r in pilots
                                          if r.config["lr"] == lr) for lr in (1e-4, 1e-3)]
    assert main.metrics.get("test_after") is not None

    # The report while the pilot runs (only pilot records yet) shows each pilot's dev score; once a cell
    # has its lr, the table of chosen learning rates replaces it.
    from zobench.report import render_report

    partial = render_report(pilots, tmp_path / "partial.md").read_text()
    assert "Suite **pilot**" in partial and "## Learning-rate pilot (in progress)" in partial
    # the pilots say what runs where until the first cell does
    model = pilots[0].config["model"]
    assert f"; model {model}; device cpu; no cells yet (2 lr pilot cells)." in partial
    assert "\nEnvironment: torch " in partial
    assert "| wall s | CPU s |" in partial and all(r.cpu_s > 0 for r in pilots)
    assert "CPU time of the 2 cells that keep it: pilots" in partial  # what choosing the lr cost, in CPU time
    rows = [line for line in partial.splitlines() if line.startswith("| random")]
    assert len(rows) == 2
    for r in pilots:  # its best and its last dev point: the suite's rule (lr_pilot.by) may take either
        curve = r.metrics.get("dev_curve")
        best, last = max(curve, key=lambda p: (p["accuracy"], -p["step"])), curve[-1]
        assert best["accuracy"] == r.metrics.get("best_dev")["accuracy"]
        assert any(f"{100 * best['accuracy']:.1f} ({best['step']}) -> {100 * last['accuracy']:.1f} ({last['step']})"
                   in row for row in rows)
    full = render_report(records, tmp_path / "full.md").read_text()
    assert "in progress" not in full and "## Learning rates chosen on dev" in full
    assert "the lr whose pilot had the highest best dev score" in full  # the rule this suite declared
