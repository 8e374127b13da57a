"""Records -> markdown text. Pure: the same records give the same bytes (no clock, no environment).

The header (``report.header``), then the claims, the measurement tables (``report.tables``), the learning
rates (``report.learning_rates``), the failed cells and the plots; every table goes through one formatter
(``report.table``).
"""

from __future__ import annotations

from zobench.report.cells import CellView, varying_axes
from zobench.report.header import header
from zobench.report.learning_rates import lr_table, pilot_progress
from zobench.report.owned import MARK
from zobench.report.quant_table import quant_table
from zobench.report.tables import (
    clip_table,
    failure_table,
    gpu_memory_table,
    host_phase_table,
    main_table,
    mask_tables,
    phase_table,
    seeds_table,
    step_table,
)


def plot_links(plots: list[tuple[str, str]]) -> list[str]:
    if not plots:
        return []
    lines = ["## Plots", ""]
    for caption, rel in plots:
        lines += [f"### {caption}", "", f"![{caption}]({rel})", ""] if rel else [caption, ""]
    return lines


def render_markdown(recs: list[CellView], title: str | None, plots: list[tuple[str, str]],
                    pilots: list[CellView] | None = None, claims=None, progress: list[str] = ()) -> str:
    """``recs``: one cell per row, in report order; ``plots``: (caption, path relative to the file);
    ``pilots``: the learning-rate pilot's cells; ``claims``: the claims section's lines (``report.claims``);
    ``progress``: the lines saying the records are not the whole suite (``report.suite_progress``)."""
    extras = varying_axes(recs)
    ok = [r for r in recs if r.ok]
    bad = [r for r in recs if not r.ok]
    lines = header(recs, title, pilots or [], progress) + (claims or [])
    for part in (seeds_table, main_table, quant_table, phase_table, gpu_memory_table, host_phase_table, step_table,
                 mask_tables):
        lines += part(ok, extras)
    lines += clip_table(ok, pilots or [])
    lines += lr_table(ok, pilots or [], extras) + pilot_progress(ok, pilots or [])
    lines += failure_table(bad, extras) + plot_links(plots)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join([*lines, "", MARK]) + "\n"  # the mark last: a later render may replace this file
