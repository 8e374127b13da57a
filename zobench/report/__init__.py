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
from zobench.report.claims import claims_section, verdict_label
from zobench.report.claims_plot import write_claims_plot
from zobench.report.figure import plots_folder
from zobench.report.header import cells_without_record, suite_progress
from zobench.report.influence import render_influence_report
from zobench.report.markdown import render_markdown
from zobench.report.owned import replaceable_plots
from zobench.report.pilot_plot import CAPTION, write_pilot_plot
from zobench.report.plots import write_plots
from zobench.results import derive, latest_by_cell, load_influence, load_records
from zobench.spec.suite import load_suite, suite_file_places

MAX_PLOTTED_CELLS = 200  # the claims suite plots 57 cells; a line per cell beyond this says nothing


def views(records: list[CellRecord]) -> list[CellView]:
    """What rendering reads: each cell's latest record, with its derived ratios under ``derived``."""
    derived = derive(records)
    return [CellView.of(r, derived[r.cell_id]) for r in latest_by_cell(records)]


def render_report(records: list[CellRecord], out_md: Path, title: str | None = None,
                  results_dir: Path | None = None, suite_path: str | Path | None = None) -> Path:
    """Writes the report for ``records`` (a re-run cell's latest record wins) to ``out_md``; returns it.
    ``results_dir``: where the records' per-example predictions are (the results file's folder), for the
    claims their suite declares. ``suite_path``: the records' suite file, where the one they name is not
    where they say (``records_suite``)."""
    out_md = Path(out_md)
    everything = sorted(views(records), key=sort_key)
    pilots = [r for r in everything if r.labels.get("stage") == "pilot"]
    recs = [r for r in everything if r.labels.get("stage") != "pilot"]
    ok = [r for r in recs if r.ok]
    folder = plots_folder(out_md)
    linked = replaceable_plots(out_md, folder)  # refused here, before any plot is drawn, if out_md is not ours
    if len(ok) <= MAX_PLOTTED_CELLS:
        plots = [(caption, f"{folder.name}/{name}")
                 for caption, name in write_plots(ok, varying_axes(recs), folder, linked)]
    else:  # a line per cell: thousands of them are unreadable, and cost gigabytes to draw
        plots = [(f"No plots: {len(ok):,} cells are more than a plot can show ({MAX_PLOTTED_CELLS}); the tables "
                  f"above and zobench.results.to_pandas hold every cell", None)]
    suite, suite_file, unread = records_suite(records, results_dir, suite_path)
    drawn = write_pilot_plot([r for r in pilots if r.ok], pilot_rule(suite, ok), folder, linked)
    if drawn:
        plots.append((CAPTION, f"{folder.name}/{drawn}"))
    claims = suite.claims if suite is not None else next((c for r in reversed(records) if (c := claims_of(r))), [])
    decision = verdicts(records, claims, results_dir or out_md.parent) if claims else None
    names = {c.id: c.name for c in claims}
    dirty = sorted({r.cell_id for r in records if (r.git or {}).get("dirty")})
    missing = None if unread else cells_without_record(suite, records)
    forest = write_claims_plot(decision.results if decision else None, names, verdict_label(missing), folder, linked)
    text = render_markdown(recs, title, plots, pilots=pilots,
                           claims=claims_section(decision, names, dirty, missing,
                                                 f"{folder.name}/{forest}" if forest else None),
                           progress=suite_progress(suite, records, suite_file, unread))
    return atomic_write(out_md, text, "report")


def pilot_rule(suite, ok: list[CellView]) -> str:
    """Which of a pilot's dev scores chooses the lr, "best" or "last": the suite's ``lr_pilot.by``, else what a
    chosen cell's record says (a suite file that cannot be read), else "best" (the default)."""
    if suite is not None and suite.lr_pilot is not None:
        return suite.lr_pilot.by
    said = next((r.lr_choice.get("by") for r in ok if isinstance(r.lr_choice, dict)), None)
    return "last" if said == "last dev score" else "best"


def _suite_file(records: list[CellRecord]) -> str | None:
    return next((r.suite_file for r in reversed(records) if r.suite_file), None)


def records_suite(records: list[CellRecord], results_dir: Path | None = None,
                  given: str | Path | None = None) -> tuple:
    """(the records' suite as its file reads now, the file, why it could not be read or None).

    The file is ``given`` (``zobench report --suite``: it must be theirs), else the one the latest record
    names. A record names it as ``zobench run`` was given it, relative to where that ran: tried from here,
    then from the folder above the results file's (``zobench run`` writes to ``results/`` by default), so
    that a report made from elsewhere reads the same suite. The suite's claims are what the report decides
    (where it cannot be read, as the latest record declared them: records carry their suite's claims), its
    cells what the records are counted against. Unreadable, or now another suite's, it is (None, the file,
    why): the report then says it cannot tell whether every cell is in."""
    name = next((r.suite for r in reversed(records) if r.suite), None)
    if given is not None:
        suite = load_suite(given)  # named by the user: a file that cannot be read is their one-line error
        if name is not None and suite.name != name:
            raise UserError(f"{given}: suite '{suite.name}', but the records are of suite '{name}'")
        return suite, str(given), None
    named = _suite_file(records)
    if not named:
        return None, None, None
    why = "not found"
    for path in suite_file_places(named, results_dir):
        try:
            suite = load_suite(path)
        except UserError as e:
            why = str(e)
            continue
        if suite.name == name:
            return suite, named, None
        why = f"{path} is now suite '{suite.name}'"
    return None, named, why


def render_results_file(results: Path, out_md: Path, suite_path: str | Path | None = None) -> Path:
    """The report of a results file: a suite's cells, or an influence suite's record."""
    influence = load_influence(results)
    if influence:
        return render_influence_report(influence[-1], out_md, f"{results} (its last influence record)")
    return render_report(load_records(results), out_md, results_dir=Path(results).parent, suite_path=suite_path)


__all__ = ["plots_folder", "render_report", "render_results_file", "views"]
