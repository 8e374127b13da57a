"""The learning-rate pilots as a figure: each arm's pilot dev score against its lr (a log axis), the highest of
each arm circled. Where a reader would rather look than read the pilot table: a choice at a grid's edge, or an
arm whose dev did not move across its grid, shows at a glance."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from zobench.report.cells import CellView, method, method_order, quant, short_name
from zobench.report.figure import OUTSIDE, color, new_figure, quant_linestyles, save_figure
from zobench.report.owned import check_plot
from zobench.spec.claims import finite_number
from zobench.spec.pilot import pilot_score

NAME = "lr_pilots.png"
CAPTION = "Learning-rate pilots: dev accuracy against lr"


def pilot_figure(pilots: list[CellView], by: str) -> Figure | None:
    """None where no pilot has an lr and a dev score (a results file is data: anything else is skipped)."""
    arms: dict[str, tuple[CellView, dict[float, float]]] = {}
    for r in pilots:
        lr, score = r.config.get("lr"), pilot_score(r, by)
        if finite_number(lr) and lr > 0 and score is not None:
            arms.setdefault(short_name(r, []), (r, {}))[1][float(lr)] = score
    if not arms:
        return None
    styles = quant_linestyles(quant(r) for r, _ in arms.values())
    steps = {s for r in pilots if isinstance(s := r.config.get("steps"), int) and not isinstance(s, bool)}
    fig, ax = new_figure(7.5, 4.5, "Learning-rate pilots" + (f" ({steps.pop()} steps)" if len(steps) == 1 else ""),
                         "learning rate", f"dev accuracy, the pilot's {by} evaluation (%)")
    ax.set_xscale("log")
    for name, (r, points) in sorted(arms.items(), key=lambda a: (method_order(method(a[1][0])), a[0])):
        lrs = sorted(points)
        ax.plot(lrs, [100 * points[lr] for lr in lrs], marker="o", markersize=4, linestyle=styles[quant(r)],
                color=color(method(r)), label=name)
        top = max(lrs, key=lambda lr: (points[lr], -lr))  # the rule's tie-break: the smaller lr
        ax.plot([top], [100 * points[top]], marker="o", markersize=11, markerfacecolor="none",
                markeredgecolor=color(method(r)), linestyle="none")
    ax.legend(fontsize="small", title="circled: each arm's highest", title_fontsize="small", **OUTSIDE)
    return fig


def write_pilot_plot(pilots: list[CellView], by: str, folder: Path, linked: set[str]) -> str | None:
    """Writes ``lr_pilots.png`` in ``folder`` and returns its name; with no pilot to draw, removes a stale one
    (zobench's own only: ``check_plot``) and returns None."""
    path = folder / NAME
    check_plot(path, linked)
    fig = pilot_figure(pilots, by)
    if fig is None:
        path.unlink(missing_ok=True)
        return None
    save_figure(fig, path)
    return path.name
