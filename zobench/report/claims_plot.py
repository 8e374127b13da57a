"""The claims of a suite as one picture (a forest plot): a row a claim, its estimate, its 1 - alpha interval
(thin) and its Holm-adjusted interval (thick: what the verdict reads), coloured by verdict, against a tick
at the declared margin. Accuracy claims in points; speed claims, on a panel of their own, as the ratio of
b's time to a's on a log axis. The report shows it under its claims table; the table holds the figures."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from zobench.analysis.stats import Result
from zobench.report.claims import has_estimate, on_report_scale
from zobench.report.figure import save_figure
from zobench.report.owned import check_plot

VERDICT_COLORS = {"holds": "#2ca02c", "does not hold": "#d62728", "not resolved": "#7f7f7f"}
SPEED = "faster_to_target"
NAME = "claims.png"


def _margins(r: Result) -> list[float]:
    """Where a claim's margin stands on its axis: a superiority or speed claim's one edge, a non-inferiority
    claim's -m, an equivalence claim's -m and +m."""
    m = abs(r.margin)
    edges = {"superiority": [r.margin], SPEED: [r.margin], "non_inferiority": [-m], "equivalence": [-m, m]}
    return [on_report_scale(v, r.kind) for v in edges.get(r.kind, [])]


def _clipped(x: float, kind: str, lo: float, hi: float) -> float:
    """A value on the panel's scale, held inside its edges (an interval to infinity ends at the edge)."""
    v = on_report_scale(x, kind)
    return math.nan if math.isnan(v) else float(np.clip(v, lo, hi))


def claims_figure(results: list[Result], names: dict[str, str], label: str = "") -> Figure | None:
    """The forest plot of ``results`` (one declaration's verdicts), its title marked with ``label`` (the
    table's: "interim"); None when there is no claim to draw, or none has an estimate yet (a plot of margins
    alone would show nothing the table does not)."""
    if not any(has_estimate(r) for r in results):
        return None
    panels = [(title, [r for r in results if (r.kind == SPEED) == speed])
              for title, speed in (("accuracy difference a - b (points)", False), ("time ratio b / a", True))]
    panels = [(title, rows) for title, rows in panels if rows]
    if not panels:
        return None
    fig = Figure(figsize=(9, 1.2 + 0.55 * len(results) + 0.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=[len(rows) for _, rows in panels])[:, 0]
    for ax, (title, rows) in zip(axes, panels):
        _panel(ax, title, rows, names)
    fig.suptitle("Claims: each interval against its margin" + (f" ({label})" if label else ""))
    handles = [Patch(color=c, alpha=0.7, label=v) for v, c in VERDICT_COLORS.items()]
    handles += [Line2D([], [], color="black", lw=5, alpha=0.35,
                       label="Holm-adjusted interval\n(what the verdict reads)"),
                Line2D([], [], color="black", lw=1.2, label="1 - alpha interval"),
                Line2D([], [], color="black", marker="o", markersize=4, linestyle="", label="estimate"),
                Line2D([], [], color="black", marker="|", markersize=16, linestyle="", label="margin")]
    axes[0].legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _panel(ax, title: str, rows: list[Result], names: dict[str, str]) -> None:
    speed = rows[0].kind == SPEED
    ends = [v for r in rows for v in (*(on_report_scale(x, r.kind) for x in (r.ci_low, r.ci_high, r.adj_low, r.adj_high,
                                                                       r.estimate)), *_margins(r))
            if math.isfinite(v) and (v > 0 or not speed)]
    lo, hi = (min(ends), max(ends)) if ends else ((0.5, 2.0) if speed else (-1.0, 1.0))
    if speed:  # a log axis: an interval that runs to 0 or to infinity is drawn to the panel's edge
        lo, hi = lo / 1.5, hi * 1.5
        ax.set_xscale("log")
        ticks = [2.0 ** k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        pad = 0.08 * (hi - lo or 1.0)
        lo, hi = lo - pad, hi + pad
    for y, r in enumerate(reversed(rows)):
        ci, adj, est = ([_clipped(x, r.kind, lo, hi) for x in xs]
                        for xs in ((r.ci_low, r.ci_high), (r.adj_low, r.adj_high), (r.estimate,)))
        c = VERDICT_COLORS.get(r.verdict, "#7f7f7f")
        ax.plot(ci, [y, y], color=c, lw=1.2, alpha=0.9)
        ax.plot(adj, [y, y], color=c, lw=5, alpha=0.55, solid_capstyle="butt")
        ax.plot(est, [y], "o", color="black", markersize=4)
        for m in _margins(r):
            ax.plot([m], [y], "|", color="black", markersize=16, markeredgewidth=1.5)
        if not has_estimate(r):
            ax.text(0.02, y, "no estimate yet", transform=ax.get_yaxis_transform(), va="center", fontsize="small",
                    color="#555555")
    ax.axvline(1.0 if speed else 0.0, color="black", lw=0.6, alpha=0.4)
    ax.set_xlim(lo, hi)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_yticks(range(len(rows)), [textwrap.fill(names.get(r.claim, r.claim), 44) for r in reversed(rows)],
                  fontsize="small")
    ax.set_xlabel(title)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def write_claims_plot(results: list[Result] | None, names: dict[str, str], label: str, folder: Path,
                      linked: set[str]) -> str | None:
    """Writes ``claims.png`` in ``folder`` and returns its name; with no claims, removes a stale one (zobench's
    own only: ``check_plot``) and returns None."""
    path = folder / NAME
    check_plot(path, linked)
    fig = claims_figure(results or [], names, label)
    if fig is None:
        path.unlink(missing_ok=True)
        return None
    save_figure(fig, path)
    return path.name
