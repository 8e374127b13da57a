"""The plain progress lines of a suite left running (no terminal): what a log of a long run says."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

import zobench.progress as P
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
