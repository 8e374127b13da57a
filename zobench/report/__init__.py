"""Report: records -> a markdown file with PNG plots beside it. A pure function of the records.

    render_report(load_records("results/smoke.jsonl"), Path("reports/smoke.md"))

writes ``reports/smoke.md`` and ``reports/smoke_plots/*.png`` (linked relatively, so the folder can be
moved or committed as a whole). Nothing reads the clock or the environment: the date shown is the
records' latest ``finished_at``, so the same records always give the same markdown. Ratios come from the
derived view of the whole set (``zobench.results.derive``), whatever order the cells ran in.
"""

from __future__ import annotations

from pathlib import Path

from zobench.analysis.verdicts import claims_of, verdicts
from zobench.cell.record import CellRecord
from zobench.errors import UserError
from zobench.files import atomic_write
from zobench.report.cells import CellView, sort_key, varying_axes
from zobench.report.claims import claims_section
from zobench.report.influence import render_influence_report
from zobench.report.markdown import render_markdown
from zobench.report.plots import plots_folder, write_plots
from zobench.results import derive, latest_by_cell, load_influence, load_records
from zobench.spec.matrix import select_cells
from zobench.spec.pilot import choose, pilot_cells
from zobench.spec.suite import load_suite

MAX_PLOTTED_CELLS = 200  # the claims suite plots 57 cells; a line per cell beyond this says nothing


def views(records: list[CellRecord]) -> list[CellView]:
    """What rendering reads: each cell's latest record, with its derived ratios under ``derived``."""
    derived = derive(records)
    return [CellView.of(r, derived[r.cell_id]) for r in latest_by_cell(records)]


def render_report(records: list[CellRecord], out_md: Path, title: str | None = None,
                  results_dir: Path | None = None) -> Path:
    """Writes the report for ``records`` (a re-run cell's latest record wins) to ``out_md``; returns it.
    ``results_dir``: where the records' per-example predictions are (the results file's folder), for the
    claims their suite declares."""
    out_md = Path(out_md)
    everything = sorted(views(records), key=sort_key)
    pilots = [r for r in everything if r.labels.get("stage") == "pilot"]
    recs = [r for r in everything if r.labels.get("stage") != "pilot"]
    ok = [r for r in recs if r.ok]
    folder = plots_folder(out_md)
    if len(ok) <= MAX_PLOTTED_CELLS:
        plots = [(caption, f"{folder.name}/{name}") for caption, name in write_plots(ok, varying_axes(recs), folder)]
    else:  # a line per cell: thousands of them are unreadable, and cost gigabytes to draw
        plots = [(f"No plots: {len(ok):,} cells are more than a plot can show ({MAX_PLOTTED_CELLS}); the tables "
                  f"above and zobench.results.to_pandas hold every cell", None)]
    suite = records_suite(records)
    claims = suite.claims if suite is not None else next((c for r in reversed(records) if (c := claims_of(r))), [])
    decision = verdicts(records, claims, results_dir or out_md.parent) if claims else None
    names = {c.id: c.name for c in claims}
    dirty = sorted({r.cell_id for r in records if (r.git or {}).get("dirty")})
    text = render_markdown(recs, title, plots, pilots=pilots, claims=claims_section(decision, names, dirty),
                           progress=suite_progress(suite, records))
    return atomic_write(out_md, text, "report")


def _suite_file(records: list[CellRecord]) -> str | None:
    return next((r.suite_file for r in reversed(records) if r.suite_file), None)


def records_suite(records: list[CellRecord]):
    """The records' suite as its file (named in the latest record that names one) reads now; None where that
    file cannot be read, or is now another suite's. Its claims are what the report decides (where it cannot be
    read, as the latest record declared them: records carry their suite's claims), its cells what the records
    are counted against."""
    path = _suite_file(records)
    name = next((r.suite for r in reversed(records) if r.suite), None)
    if not path:
        return None
    try:
        suite = load_suite(path)
    except UserError:
        return None
    return suite if suite.name == name else None


def suite_progress(suite, records: list[CellRecord]) -> list[str]:
    """A line when some of the suite's cells have no record (a run going on or stopped, or some cells run
    with --only), so that no one reads a part as the whole; and when some records are not cells of the suite
    as it reads now (it, or a default, changed since they ran). The cells are counted as ``zobench run
    --resume`` counts them: with each learning rate its pilot chose."""
    if suite is None:
        return []
    cells = select_cells(suite, None)
    pilots = pilot_cells(cells, suite.lr_pilot) if suite.lr_pilot is not None else []
    if suite.lr_pilot is not None:
        cells, _ = choose(cells, suite.lr_pilot, records)
    recorded = {r.cell_id for r in latest_by_cell(records)}
    strangers = recorded - {c.cell_id for c in [*cells, *pilots]}
    if strangers == recorded:
        return [f"> None of these records is a cell of {_suite_file(records)} as it reads now (the file, or a "
                f"default, changed since they ran).", ""]
    parts = []
    for group, what in ((pilots, "lr pilot cells"), (cells, "cells")):
        missing = sum(c.cell_id not in recorded for c in group)
        if missing:
            parts.append(f"{missing} of the suite's {len(group)} {what} {'has' if missing == 1 else 'have'} no record")
    lines = []
    if parts:
        lines.append(f"> Not the whole suite: {'; '.join(parts)} (not run yet, or left out with --only). The "
                     f"tables, plots and verdicts below are of the cells recorded so far; `zobench run "
                     f"{_suite_file(records)} --resume` runs the others.")
    if strangers:
        lines.append(f"> {cells_word(len(strangers))} in these records {'is' if len(strangers) == 1 else 'are'} "
                     f"not among the suite's cells as its file reads now (the file, or a default, changed since "
                     f"they ran).")
    return [line for text in lines for line in (text, "")]


def cells_word(n: int) -> str:
    return f"{n} cell" + ("" if n == 1 else "s")


def render_results_file(results: Path, out_md: Path) -> Path:
    """The report of a results file: a suite's cells, or an influence suite's record."""
    influence = load_influence(results)
    if influence:
        return render_influence_report(influence[-1], out_md)
    return render_report(load_records(results), out_md, results_dir=Path(results).parent)


__all__ = ["plots_folder", "render_report", "render_results_file", "views"]
