"""Live progress of a suite run (rich), and the summary table at the end.

On a terminal: a bar for the suite (cells done, ETA) and one for the current cell (step, loss).
Elsewhere (CI logs): one plain line per finished cell and every tenth step.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class SuiteProgress:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, disable=not self.live)
        self.suite_task = self.cell_task = None
        self.records: list[dict] = []

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
        return False

    def __call__(self, event: str, data: dict) -> None:
        if event == "suite":
            self.suite_task = self.progress.add_task("cells", total=data["todo"], info="")
            if data["skipped"]:
                self._line(f"resume: {data['skipped']} of {data['total']} cells already done")
        elif event == "cell":
            desc = data["cell"].describe()
            if self.cell_task is not None:
                self.progress.remove_task(self.cell_task)
            self.cell_task = self.progress.add_task(desc[:60], total=data["cell"].config.steps, info="")
            if not self.live:
                self._line(f"[{data['index'] + 1}] {desc} ...")
        elif event == "progress" and self.cell_task is not None and "step" in data:
            self.progress.update(self.cell_task, completed=data["step"], info=f"loss {data['loss']:.4f}")
            if not self.live and data["step"] % 10 == 0:
                self._line(f"    step {data['step']}/{data['steps']} loss {data['loss']:.4f}")
        elif event == "done":
            rec = data["record"]
            self.records.append(rec)
            self.progress.advance(self.suite_task)
            status = rec["status"] if rec["status"] == "ok" else f"{rec['status']}: {rec.get('reason')}"
            self._line(f"[{data['index'] + 1}] {data['cell'].describe()} -> {status} ({rec['wall_s']:.0f} s)")
            for warning in rec.get("warnings") or []:
                self._line(f"    warning: {warning}")

    def _line(self, text: str) -> None:
        if self.live:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def summary(self) -> Table:
        t = Table(title="zobench run: " + " / ".join(self.records[0].get("labels", {})) if self.records else "zobench run")
        t.add_column("cell", no_wrap=True)
        for col in ("status", "peak MiB", "step ms", "step/2fwd", "acc before", "acc after"):
            t.add_column(col)
        for r in self.records:
            m, d = r.get("metrics", {}), r.get("derived", {})

            def acc(when):
                v = (m.get(when) or {})
                v = v.get("accuracy", v.get("f1"))
                return "-" if v is None else f"{100 * v:.1f}%"

            step = (m.get("step_s") or {}).get("median")
            t.add_row(" ".join(str(v) for v in r.get("labels", {}).values()), r["status"],
                      f"{d['peak_mib']:.0f}" if d.get("peak_mib") else "-",
                      f"{step * 1000:.0f}" if step else "-",
                      f"{d['step_over_two_forwards']:.2f}" if d.get("step_over_two_forwards") else "-",
                      acc("test_before"), acc("test_after"))
        return t
