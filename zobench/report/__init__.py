"""Report: records -> a markdown file with PNG plots beside it. A pure function of the records.

    render_report(read_records("results/smoke.jsonl"), Path("reports/smoke.md"))

writes ``reports/smoke.md`` and ``reports/smoke_plots/*.png`` (linked relatively, so the folder can be
moved or committed as a whole). Nothing reads the clock or the environment: the date shown is the
records' latest ``finished_at``, so the same records always give the same markdown.
"""

from __future__ import annotations

from pathlib import Path

from zobench.results import latest_by_cell


def render_report(records: list[dict], out_md: Path, title: str | None = None) -> Path:
    """Writes the report for ``records`` (a re-run cell's latest record wins) to ``out_md``; returns it."""
    from zobench.report.cells import sort_key, varying_axes
    from zobench.report.markdown import render_markdown
    from zobench.report.plots import write_plots

    out_md = Path(out_md)
    influence = [r for r in records if r.get("kind") == "influence"]
    if influence:  # an influence suite's record has its own report
        from zobench.report.influence import render_influence_report

        return render_influence_report(influence[-1], out_md)
    recs = sorted(latest_by_cell(records), key=sort_key)
    ok = [r for r in recs if r.get("status") == "ok"]
    folder = out_md.parent / f"{out_md.stem}_plots"
    plots = [(caption, f"{folder.name}/{name}") for caption, name in write_plots(ok, varying_axes(recs), folder)]
    from zobench.files import atomic_write

    return atomic_write(out_md, render_markdown(recs, title, plots), "report")
