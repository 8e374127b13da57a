"""Live progress of a suite run (rich), and the summary table at the end.

On a terminal: a bar for the suite (cells done, ETA) and one per running cell (step, loss). Elsewhere (CI
logs, a suite left running for hours): one plain line per started and finished cell and every tenth step; a
finished cell's line says how many are left and, at this run's pace so far, about how long they take: the
pace is per step of the finished cells (a suite's cells may run 20 steps or 1,000) and per method family (a
reference forward cell's step is one forward, a ZO step two and more: forward cells that finish first would
otherwise set the pace of the trained cells after them), and while the lr pilots run the line also says what
the cells stage after them holds, at the same pace. A cell's time is priced in two parts: its stepped phases
(warm-up, training, the dev evaluations among its steps) per step, and the rest (load, mask, quantize, test
evaluations) per cell, so that a short cell's load does not read as slow steps.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from zobench.results import derive

# A family's cost per step relative to a reference forward, until the run has timed a cell of it: two
# forwards a ZO step, about three for a forward and backward pass.
FORWARDS_PER_STEP = {"reference": 1.0, "zo": 2.0, "fo": 3.0}
# The phases whose time grows with a cell's steps; a cell's other phases are its per-cell cost.
STEPPED_PHASES = ("warmup", "train", "eval_dev")


class SuiteProgress:
    def __init__(self, console: Console | None = None, clock=time.monotonic):
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, disable=not self.live)
        self.suite_task = None
        self.cell_tasks: dict[str, int] = {}
        self.numbers: dict[str, int] = {}
        self.records = []
        self.clock = clock
        self.todo, self.finished, self.began = 0, 0, clock()
        self.steps, self.then = 0, None  # this stage's steps; the stage to come
        self.families: dict[str, int] = {}  # this stage's steps by method family (zo, fo, reference)
        self.finished_by: dict[str, int] = {}  # of them, the finished cells' whole steps
        self.run_by: dict[str, int] = {}  # and the steps this run ran of those (not a resumed cell's earlier)
        self.cost: dict[str, list[float]] = {}  # family: [stepped seconds, steps run], the whole run's cells
        self.per_cell: list[float] = []  # each timed cell's seconds outside its stepped phases, the whole run's

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
        return False

    def __call__(self, event: str, data: dict) -> None:
        if event == "suite":
            what = data.get("what", "cells")
            self.suite_task = self.progress.add_task(what, total=data["todo"], info="")
            self.todo, self.finished, self.began = data["todo"], 0, self.clock()
            self.steps, self.then = data.get("steps", 0), data.get("then")
            self.families = data.get("families") or ({"?": self.steps} if self.steps else {})
            self.finished_by, self.run_by = {}, {}
            if what == "pilot":
                self._line(f"learning-rate pilot: {data['total']} short cells choose the cells' lr on dev")
            if data["skipped"]:
                self._line(f"resume: {data['skipped']} of {data['total']} {'lr pilots' if what == 'pilot' else what} "
                           f"already done")
        elif event == "start":
            cell = data["cell"]
            self.numbers[cell.cell_id] = len(self.numbers) + 1
            self.cell_tasks[cell.cell_id] = self.progress.add_task(cell.describe()[:60], total=cell.config.steps,
                                                                   info="")
            if not self.live:
                self._line(f"[{self.numbers[cell.cell_id]}] {cell.describe()} ...")
        elif event == "progress" and "step" in data and data["cell"].cell_id in self.cell_tasks:
            cell = data["cell"]
            self.progress.update(self.cell_tasks[cell.cell_id], completed=data["step"], info=f"loss {data['loss']:.4f}")
            if not self.live and data["step"] % 10 == 0:
                self._line(f"    [{self.numbers[cell.cell_id]}] step {data['step']}/{data['steps']} "
                           f"loss {data['loss']:.4f}")
        elif event == "done":
            self._done(data["cell"], data["record"])
        elif event == "waiting":
            self._line(f"{data['cells']} cells wait for their lr pilots: a pilot of their grid has no dev score "
                       f"(it failed, or has no dev set); --resume runs it again, then them")

    def _done(self, cell, rec) -> None:
        self.records.append(rec)
        task = self.cell_tasks.pop(cell.cell_id, None)
        if task is not None:
            self.progress.remove_task(task)
        self.progress.advance(self.suite_task)
        status = rec.status if rec.ok else f"{rec.status}: {rec.reason}"
        self.finished += 1
        family = _family(cell)
        family = family if family in self.families else "?"
        # the pace is this run's: a cell resumed from its checkpoint ran only the steps after it here
        ran = max(0, cell.config.steps - _int(rec.metrics.get("resumed_from_step")))
        self.finished_by[family] = self.finished_by.get(family, 0) + cell.config.steps
        self.run_by[family] = self.run_by.get(family, 0) + ran
        if ran and isinstance(rec.wall_s, (int, float)) and rec.wall_s > 0:
            stepped, fixed = _split(rec)
            spent = self.cost.setdefault(family, [0.0, 0])
            spent[0], spent[1] = spent[0] + stepped, spent[1] + ran
            if fixed is not None:
                self.per_cell.append(fixed)
        self._line(f"[{self.numbers.get(cell.cell_id, '?')}] {cell.describe()} -> {status} ({rec.wall_s or 0:.0f} s)"
                   f"{self._left()}")
        for warning in rec.warnings:
            self._line(f"    warning: {warning}")

    def _left(self) -> str:
        """'; N of M left, about T at this run's pace[; then K cells, about U]' (the pace: this run's wall time
        per step of its finished cells and per cell, scaled so that this stage's finished cells take the time
        they took, so concurrent cells and a loaded machine count as they are; per cell where the steps are not
        known)."""
        left = self.todo - self.finished
        then = self.then or {}
        elapsed = self.clock() - self.began
        weight = self._weights()
        per_cell = sum(self.per_cell) / len(self.per_cell) if self.per_cell else 0.0
        ran = sum(n * weight(f) for f, n in self.run_by.items()) + self.finished * per_cell
        if self.steps and ran:
            scale = elapsed / ran  # this stage's wall over what its finished cells are priced at
            eta = scale * (sum((n - self.finished_by.get(f, 0)) * weight(f) for f, n in self.families.items())
                           + left * per_cell)
            coming = then.get("families") or {"?": then.get("steps", 0)}
            later = scale * (sum(n * weight(f) for f, n in coming.items()) + then.get("cells", 0) * per_cell)
        else:
            eta, later = elapsed / self.finished * left, None
        after = ""
        if then.get("cells"):
            n = then["cells"]
            after = f"; then {n} cell{'s' if n != 1 else ''}" + (f", about {_span(later)}" if later else "")
        if left <= 0:
            return f"; {self.todo} of {self.todo} done{after}"
        return f"; {left} of {self.todo} left, about {_span(eta)} at this run's pace{after}"

    def _weights(self):
        """family -> the cost of its step: its cells' stepped seconds per step where this run has timed one (any
        stage), else its FORWARDS_PER_STEP from a timed family's (else 1, one pace for all)."""
        timed = {f: s / n for f, (s, n) in self.cost.items() if n and s}
        per_forward = [timed[f] / FORWARDS_PER_STEP[f] for f in timed if f in FORWARDS_PER_STEP]
        unit = sum(per_forward) / len(per_forward) if per_forward else None

        def weight(family: str) -> float:
            if family in timed:
                return timed[family]
            if unit is not None and family in FORWARDS_PER_STEP:
                return unit * FORWARDS_PER_STEP[family]
            return sum(timed.values()) / len(timed) if timed else 1.0
        return weight

    def _line(self, text: str) -> None:
        if self.live:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def summary(self) -> Table:
        derived = derive(self.records)
        t = Table(title="zobench run")
        t.add_column("cell", no_wrap=True)
        for col in ("status", "peak MiB", "step ms", "step / 2 fwd", "acc before", "acc after"):
            t.add_column(col)
        for r in self.records:
            d = derived[r.cell_id]

            def acc(when):
                v = r.metrics.get(when) or {}
                v = v.get("accuracy", v.get("f1"))
                return "-" if v is None else f"{100 * v:.1f}%"

            step = r.metrics.step_s.median if r.metrics.step_s else None
            t.add_row(" ".join(str(v) for v in r.labels.values()), r.status,
                      f"{d.peak_mib:.0f}" if d.peak_mib else "-", f"{step * 1000:.0f}" if step else "-",
                      f"{d.step_over_two_forwards:.2f}" if d.step_over_two_forwards else "-",
                      acc("test_before"), acc("test_after"))
        return t


def _split(rec) -> tuple[float, float | None]:
    """(a finished cell's seconds in its stepped phases, its seconds outside them): the whole wall and None
    where its record has no phase times (the whole cell is then priced per step)."""
    stepped = [rec.phases[p].wall_s for p in STEPPED_PHASES if p in rec.phases]
    if not stepped or any(not isinstance(s, (int, float)) for s in stepped):
        return rec.wall_s, None
    stepped = min(sum(stepped), rec.wall_s)
    return stepped, rec.wall_s - stepped


def _family(cell) -> str:
    info = getattr(cell.config, "method_info", None)
    return getattr(info, "family", "?")


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"
