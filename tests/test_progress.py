"""The plain progress lines of a suite left running (no terminal): what a log of a long run says."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

import zobench.progress as P
from zobench.cell.measures import PhaseMeasure
from zobench.cell.record import CellRecord


def test_a_finished_cell_says_how_many_are_left_and_about_how_long(capsys):
    clock = iter([0.0, 1000.0, 1000.0 + 1800, 1000.0 + 3 * 3600])
    progress = P.SuiteProgress(Console(file=io.StringIO(), force_terminal=False), clock=lambda: next(clock))
    cells = [SimpleNamespace(cell_id=f"c{i}", describe=lambda i=i: f"seed={i}", config=SimpleNamespace(steps=10))
             for i in range(5)]
    with progress:
        progress("suite", {"total": 7, "todo": 5, "skipped": 2, "what": "cells"})
        for cell, wall in ((cells[0], 1800), (cells[1], 9000)):
            progress("start", {"cell": cell})
            progress("done", {"cell": cell, "record": CellRecord(cell.cell_id, status="ok", wall_s=wall)})
    err = capsys.readouterr().err.splitlines()
    assert "resume: 2 of 7 cells already done" in err
    done = [line for line in err if "-> ok" in line]
    # 30 min for the first cell: 4 left at that pace, 2 h; 3 h for two: 3 left, 4.5 h
    assert done == ["[1] seed=0 -> ok (1800 s); 4 of 5 left, about 2.0 h at this run's pace",
                    "[2] seed=1 -> ok (9000 s); 3 of 5 left, about 4.5 h at this run's pace"]


def test_the_pace_is_per_step_and_the_pilot_lines_say_what_the_cells_stage_holds(capsys):
    """Cells of 20 and 1,000 steps: the time left is the steps left at this run's time per step. While the lr
    pilots run, each line also says how many cells come after them and about how long they take."""
    clock = iter([0.0, 600.0, 600.0 + 30, 600.0 + 30 + 1500, 10_000.0, 10_000.0 + 900])
    progress = P.SuiteProgress(Console(file=io.StringIO(), force_terminal=False), clock=lambda: next(clock))

    def cell(i, steps):
        return SimpleNamespace(cell_id=f"c{i}", describe=lambda: f"cell {i}", config=SimpleNamespace(steps=steps))

    with progress:
        # the cells stage: 20-step forward cells beside 1000-step trained ones
        cells = [cell(0, 20), cell(1, 1000), cell(2, 20), cell(3, 1000)]
        progress("suite", {"total": 4, "todo": 4, "skipped": 0, "what": "cells", "steps": 2040, "then": None})
        for c in cells[:2]:
            progress("start", {"cell": c})
            progress("done", {"cell": c, "record": CellRecord(c.cell_id, status="ok")})
        # the pilots of another run: 300 steps each, 48 cells of 48,000 steps after them
        pilots = [cell(10 + i, 300) for i in range(3)]
        progress("suite", {"total": 5, "todo": 3, "skipped": 2, "what": "pilot", "steps": 900,
                           "then": {"cells": 48, "steps": 48_000}})
        progress("start", {"cell": pilots[0]})
        progress("done", {"cell": pilots[0], "record": CellRecord(pilots[0].cell_id, status="ok")})
    err = capsys.readouterr().err.splitlines()
    assert "resume: 2 of 5 lr pilots already done" in err
    done = [line.split("; ", 1)[1] for line in err if "-> ok" in line]
    # 30 s for 20 steps: 2,020 left at 1.5 s a step (a per-cell pace would have said 3 x 30 s)
    assert done[0] == "3 of 4 left, about 50 min at this run's pace"
    # 1,530 s for 1,020 steps: 1,020 left at 1.5 s
    assert done[1] == "2 of 4 left, about 26 min at this run's pace"
    # 900 s for a 300-step pilot: 600 steps left (30 min), then 48,000 steps at 3 s (40 h)
    assert done[2] == "2 of 3 left, about 30 min at this run's pace; then 48 cells, about 40.0 h"


def test_a_resumed_cell_counts_toward_the_pace_only_the_steps_this_run_ran(capsys):
    """A 1,000-step cell resumed from its step-800 checkpoint ran 200 steps in this run's time: the pace is
    that time over 200 steps (over its whole 1,000 it would read five times too fast), while the steps left
    are still the stage's others."""
    clock = iter([0.0, 0.0, 400.0])
    progress = P.SuiteProgress(Console(file=io.StringIO(), force_terminal=False), clock=lambda: next(clock))
    cells = [SimpleNamespace(cell_id=f"c{i}", describe=lambda i=i: f"cell {i}", config=SimpleNamespace(steps=1000))
             for i in range(2)]
    with progress:
        progress("suite", {"total": 2, "todo": 2, "skipped": 0, "what": "cells", "steps": 2000, "then": None})
        progress("start", {"cell": cells[0]})
        rec = CellRecord(cells[0].cell_id, status="ok")
        rec.metrics.set(resumed_from_step=800)
        progress("done", {"cell": cells[0], "record": rec})
    err = capsys.readouterr().err.splitlines()
    # 400 s for 200 steps: 2 s a step, 1,000 steps left
    done = [line.split("; ", 1)[1] for line in err if "-> ok" in line]
    assert done == ["1 of 2 left, about 33 min at this run's pace"]


def _cell(i, steps, family):
    info = SimpleNamespace(family=family)
    return SimpleNamespace(cell_id=f"c{i}", describe=lambda: f"cell {i}",
                           config=SimpleNamespace(steps=steps, method_info=info))


def test_forward_cells_that_finish_first_do_not_set_the_pace_of_the_trained_cells(capsys):
    """A suite's reference forward cells (20 steps, one forward each) finish before its ZO cells (1,000
    steps, two forwards each). Until a ZO cell is timed, its step is priced at two of the forward cells'
    (a pace per step of everything would say half the time); a pilot stage's ZO cells time it for the
    cells stage after them."""
    clock = iter([0.0, 0.0, 15.0])
    progress = P.SuiteProgress(Console(file=io.StringIO(), force_terminal=False), clock=lambda: next(clock))
    fwd = _cell(0, 20, "reference")
    with progress:
        progress("suite", {"total": 4, "todo": 4, "skipped": 0, "what": "cells", "steps": 2040,
                           "families": {"reference": 40, "zo": 2000}, "then": None})
        progress("start", {"cell": fwd})
        progress("done", {"cell": fwd, "record": CellRecord(fwd.cell_id, status="ok", wall_s=15.0)})
    # another run: two 300-step pilots, then the same four cells
    clock = iter([0.0, 0.0, 600.0, 1000.0, 1010.0])
    progress = P.SuiteProgress(Console(file=io.StringIO(), force_terminal=False), clock=lambda: next(clock))
    with progress:
        pilot = _cell(10, 300, "zo")
        progress("suite", {"total": 2, "todo": 2, "skipped": 0, "what": "pilot", "steps": 600,
                           "families": {"zo": 600},
                           "then": {"cells": 4, "steps": 2040, "families": {"reference": 40, "zo": 2000}}})
        progress("start", {"cell": pilot})
        progress("done", {"cell": pilot, "record": CellRecord(pilot.cell_id, status="ok", wall_s=600.0)})
        progress("suite", {"total": 4, "todo": 4, "skipped": 0, "what": "cells", "steps": 2040,
                           "families": {"reference": 40, "zo": 2000}, "then": None})
        progress("start", {"cell": fwd})
        progress("done", {"cell": fwd, "record": CellRecord(fwd.cell_id, status="ok", wall_s=10.0)})
    err = capsys.readouterr().err.splitlines()
    done = [line.split("; ", 1)[1] for line in err if "-> ok" in line]
    # 0.75 s a forward step, so 1.5 s a ZO step: 20 x 0.75 + 2,000 x 1.5 = 3,015 s (one pace: 2,020 x 0.75)
    assert done[0] == "3 of 4 left, about 50 min at this run's pace"
    # the pilot's 2 s a ZO step: 300 left (10 min); then 40 forward steps at half a ZO step's 2 s and
    # 2,000 ZO steps: 4,040 s
    assert done[1] == "1 of 2 left, about 10 min at this run's pace; then 4 cells, about 67 min"
    # the cells stage: the forward cell's own 0.5 s a step, the pilot's 2 s a ZO step: 10 + 4,000 s
    assert done[2] == "3 of 4 left, about 67 min at this run's pace"


def test_spans_read_in_seconds_minutes_or_hours():
    assert [P._span(s) for s in (20, 89.4, 90, 5399, 5400, 36_000)] == ["20 s", "89 s", "2 min", "90 min", "1.5 h",
                                                                        "10.0 h"]


def test_a_cells_load_is_priced_per_cell_not_as_slow_steps(capsys):
    """A 20-step forward cell that took 30 s, 20 of them loading and 10 stepping: the ZO cell after it (20
    steps, two forwards each) is priced at its load's 20 s and 20 steps of 1 s, 40 s; pricing the whole wall
    per step would say 20 x 2 x 1.5 s, 60 s."""
    clock = iter([0.0, 0.0, 30.0])
    progress = P.SuiteProgress(Console(file=io.StringIO(), force_terminal=False), clock=lambda: next(clock))
    fwd = _cell(0, 20, "reference")
    rec = CellRecord(fwd.cell_id, status="ok", wall_s=30.0,
                     phases={"load": PhaseMeasure(wall_s=19.0), "train": PhaseMeasure(wall_s=10.0),
                             "eval_after": PhaseMeasure(wall_s=1.0)})
    with progress:
        progress("suite", {"total": 2, "todo": 2, "skipped": 0, "what": "cells", "steps": 40,
                           "families": {"reference": 20, "zo": 20}, "then": None})
        progress("start", {"cell": fwd})
        progress("done", {"cell": fwd, "record": rec})
    err = capsys.readouterr().err.splitlines()
    assert [line.split("; ", 1)[1] for line in err if "-> ok" in line] == ["1 of 2 left, about 40 s at this run's pace"]
