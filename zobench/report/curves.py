"""Records -> PNG curves over a run: training loss and dev score against steps, and dev score against training
seconds, one line a configuration with its seeds averaged and their range shaded."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from zobench.report.cells import CellView, configs, meaningful, method, primary_score, quant
from zobench.report.figure import OUTSIDE, color, new_figure, quant_linestyles, seeds_note

STYLE_NOTE = "(colour: method; line style: quant backend, solid float; shaded: range over seeds)"


def smoothed(values: list, window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start), of the finite ones only: a diverged step's
    inf or nan leaves a gap at that step, not in every mean after it. NaN where a window holds none. Linear in
    the number of values (prefix sums): a record's curve is data, and may be long."""
    arr = np.array([v if isinstance(v, (int, float)) else math.nan for v in values], dtype=float)
    finite = np.isfinite(arr)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, arr, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    end = np.arange(1, len(arr) + 1)
    start = np.maximum(end - window, 0)
    n = counts[end] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[end] - sums[start]) / np.maximum(n, 1), math.nan).tolist()


def _by_config(cells: list[CellView], extras: list[str], points) -> dict[str, list[tuple[CellView, list]]]:
    """The cells' ``points(cell)`` (a list of (x, y); cells with none left out) by configuration."""
    groups = {name: [(r, series) for r in runs if (series := points(r))]
              for name, runs in configs(cells, extras).items()}
    return {name: runs for name, runs in groups.items() if runs}


def _over_seeds(groups: dict, title: str, xlabel: str, ylabel: str) -> Figure | None:
    """One line per configuration (``_by_config``), its colour the method's and its line style the quant
    backend's: the mean over its seeds at each point, the range over seeds shaded (points line up by position:
    steps are the same across seeds; seconds are averaged)."""
    if not groups:
        return None
    fig, ax = new_figure(8.5, 4.5, title, xlabel, ylabel)
    if xlabel == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    styles = quant_linestyles(quant(runs[0][0]) for runs in groups.values())
    for name, runs in groups.items():
        series = [s for _, s in runs]
        n = min(len(s) for s in series)
        xs = [sum(s[i][0] for s in series) / len(series) for i in range(n)]
        ys = [[s[i][1] for s in series] for i in range(n)]
        col = color(method(runs[0][0]))
        ax.plot(xs, [sum(y) / len(y) for y in ys], color=col, linestyle=styles[quant(runs[0][0])],
                marker="." if n <= 60 else None, label=name + seeds_note(len(runs)))
        if len(runs) > 1:
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=col, alpha=0.15, linewidth=0)
    ax.legend(fontsize="small", **OUTSIDE)
    return fig


def loss_curves(ok: list[CellView], extras: list[str]):
    """Training loss a configuration, seeds averaged: each run's per-batch loss as a trailing mean over 1/50 of
    the longest run (ZO's single-batch losses are noisy, and a line a seed is many lines a suite)."""
    trained = [r for r in ok if method(r) != "forward" and r.metrics.get("loss_curve")]
    if not trained:
        return None
    window = max(1, max(len(r.metrics.get("loss_curve")) for r in trained) // 50)

    def points(r):
        return list(enumerate(smoothed(r.metrics.get("loss_curve"), window), start=1))

    trailing = f", trailing mean of {window} steps" if window > 1 else ""
    return _over_seeds(_by_config(trained, extras, points),
                       f"Training loss{trailing}, warm-up included\n{STYLE_NOTE}",
                       "step", "training loss")


def _dev_points(r: CellView, x_key: str) -> list[tuple[float, float]]:
    curve = r.metrics.get("dev_curve") or []
    return [(p[x_key], 100 * primary_score(p)) for p in curve if primary_score(p) is not None and x_key in p]


def _dev_over_seeds(ok: list[CellView], extras: list[str], title: str, xlabel: str, x_key: str) -> Figure | None:
    return _over_seeds(_by_config([r for r in ok if meaningful(r)], extras, lambda r: _dev_points(r, x_key)),
                       title, xlabel, "dev accuracy (%) (F1 for generative tasks)")


def dev_curves(ok: list[CellView], extras: list[str]):
    return _dev_over_seeds(ok, extras, f"Dev score against steps\n{STYLE_NOTE}", "step", "step")


def dev_vs_time(ok: list[CellView], extras: list[str]):
    """Seconds as each cell measured them: cells that ran at other times under other load are not timed side by
    side here (the claims' speed comparisons use a declared clock), and the title says so."""
    return _dev_over_seeds(ok, extras, "Dev score against training time (warm-up included, evaluations excluded;\n"
                           "seconds as measured: a cell run on a busy machine reads slow)",
                           "training seconds", "train_s")
