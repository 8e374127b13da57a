"""Records -> PNG plots of memory and step time per cell, and memory against accuracy (the curves over steps and
seconds: ``report.curves``). Each plot function returns a Figure, or None when the records hold no data for it;
``write_plots`` writes those with data."""

from __future__ import annotations

import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from zobench.report.cells import (
    TRAINING_ONLY,
    CellView,
    axis_value,
    configs,
    density,
    meaningful,
    median,
    method,
    method_order,
    pct,
    primary_score,
    quant,
    setting,
)
from zobench.report.curves import dev_curves, dev_vs_time, loss_curves
from zobench.report.figure import OUTSIDE, color, legend, method_legend, new_figure, save_figure, seeds_note
from zobench.report.owned import check_plot
from zobench.results import phase_peak as kind_peak

PART_COLORS = {"perturb": "#9467bd", "forward_plus": "#1f77b4", "forward_minus": "#aec7e8",
               "forward": "#17becf", "backward": "#ff7f0e", "update": "#2ca02c"}
MARKERS = ("o", "s", "^", "D", "v", "P")  # one per quant backend in the memory/accuracy plot


def spread(values: list[float], centre) -> tuple[float, list[list[float]]]:
    """``centre(values)`` and its distance to the lowest and the highest, as matplotlib's error bars take it."""
    c = centre(values)
    return c, [[c - min(values)], [max(values) - c]]


def memory_bars(ok: list[CellView], extras: list[str]):
    """Training peak per configuration, grouped by quant: the median over its seeds, their range as whiskers;
    the group's forward (inference) peak as a dashed line."""
    cells = [r for r in ok if isinstance(r.derived.peak_mib, (int, float))]
    if not cells:
        return None
    groups: dict[str, list[CellView]] = {}
    for r in cells:
        # an lr is no group of its own: the forward cell's line belongs beside its trained cells
        group = [str(setting(r, "quant") or "none")] + [axis_value(r, a) for a in extras
                                                        if a not in TRAINING_ONLY and a != "seed"]
        groups.setdefault("/".join(group), []).append(r)
    bars = {group: configs(members, extras) for group, members in groups.items()}
    n_bars = sum(len(b) for b in bars.values())
    fig, ax = new_figure(max(6.0, 0.7 * n_bars + 3.5), 4.5, "", "", "peak memory (MiB)")
    x, ticks, names, folded = 0.0, [], [], False
    for group, by_config in bars.items():
        start, fwd = x, None
        for runs in by_config.values():
            r = runs[0]
            peak, whiskers = spread([c.derived.peak_mib for c in runs], statistics.median)
            ax.bar(x, peak, color=color(method(r)), width=0.8)
            if len(runs) > 1:
                ax.errorbar(x, peak, yerr=whiskers, fmt="none", ecolor="black", elinewidth=1, capsize=3)
                folded = True
            top = peak + whiskers[1][0]  # above the highest seed's whisker, where there is one
            ax.annotate(f"{peak:.0f}", (x, top), ha="center", va="bottom", fontsize="x-small",
                        xytext=(0, 3 if len(runs) > 1 else 0), textcoords="offset points")
            ticks.append(x)
            names.append(method(r) + (f" {pct(density(r))}" if density(r) is not None else "")
                         + seeds_note(len(runs)))
            if method(r) == "forward" and fwd is None:
                fwd = peak
            x += 1
        if fwd is not None:
            ax.hlines(fwd, start - 0.45, x - 0.55, colors="black", linestyles="dashed", linewidth=1)
        ax.annotate(f"quant {group}", ((start + x - 1) / 2, 1.0), xycoords=("data", "axes fraction"),
                    ha="center", va="bottom", fontsize="small")
        x += 0.6
    ax.set_xticks(ticks, names, rotation=30, ha="right", fontsize="small")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    over = "; medians over seeds, whiskers their range" if folded else ""
    ax.set_title(f"Peak memory while training (dashed: forward reference{over})", pad=18)
    method_legend(ax, cells)
    return fig


PHASE_COLORS = {"load": "#7f7f7f", "mask": "#8c564b", "quantize": "#e377c2", "eval_before": "#c7c7c7",
                "warmup": "#aec7e8", "train": "#1f77b4", "eval_dev": "#9edae5", "eval_after": "#dbdb8d",
                "eval_best": "#bcbd22"}


def phase_bars(ok: list[CellView], extras: list[str]):
    """Peak memory of every phase of every configuration (the median over its seeds), side by side, each with
    its estimate as a black tick (records from before phase estimates: one tick across the cell, the training
    estimate): where a cell's whole peak is, and whether the estimate sees it."""
    cells = [r for r in ok if r.phases]
    if not cells:
        return None
    phases = [p for p in PHASE_COLORS if any(p in r.phases for r in cells)]
    if not phases:  # (records whose phases zobench does not name)
        return None
    groups = list(configs(cells, extras).values())
    width = 0.8 / len(phases)
    fig, ax = new_figure(max(6.0, 0.25 * len(groups) * len(phases) + 3.5), 4.5, "", "", "peak memory (MiB)")

    def folded(values):
        values = [v for v in values if isinstance(v, (int, float))]
        return statistics.median(values) if values else None

    for i, runs in enumerate(groups):
        for j, p in enumerate(phases):
            v = folded([kind_peak(r, (p,))[0] for r in runs])  # of the kind the cell's peak is (derived.peak_kind)
            x = i - 0.4 + (j + 0.5) * width
            if v is not None:
                ax.bar(x, v, width=width, color=PHASE_COLORS[p])
                est = folded([r.estimated_phase_mib(p) for r in runs])
                if est is not None:
                    ax.hlines(est, x - width / 2, x + width / 2, colors="black", linewidth=1.5)
        est = folded([r.estimated_peak_mib for r in runs if r.estimated_phase_mib("load") is None])
        if est is not None:
            ax.hlines(est, i - 0.45, i + 0.45, colors="black", linewidth=1.5)
    ax.set_xticks(range(len(groups)), [f"{method(r[0])} {quant(r[0])}" + (f" {pct(density(r[0]))}" if density(r[0])
                                                                          is not None else "") + seeds_note(len(r))
                                       for r in groups],
                  rotation=30, ha="right", fontsize="small")
    over = "; medians over seeds" if any(len(r) > 1 for r in groups) else ""
    ax.set_title(f"Peak memory by phase (black: each phase's estimate{over})")
    legend(ax, {p: PHASE_COLORS[p] for p in phases})
    return fig


def step_breakdown(ok: list[CellView], extras: list[str]):
    """Median milliseconds per part of a step, stacked, a configuration (its seeds' medians, their median):
    where a ZO step's time goes."""
    groups = configs([r for r in ok if r.metrics.step_parts_s], extras)
    if not groups:
        return None
    over = ", over seeds" if any(len(runs) > 1 for runs in groups.values()) else ""
    fig, ax = new_figure(8.5, max(2.5, 0.45 * len(groups) + 1.5), f"Step time by part (medians{over})", "time (ms)", "")
    drawn: set[str] = set()
    for y, runs in enumerate(groups.values()):
        left = 0.0
        for part, col in PART_COLORS.items():
            meds = [m for r in runs if isinstance(m := median(r.metrics.step_parts_s.get(part)), (int, float))]
            if not meds:
                continue
            med = statistics.median(meds)
            ax.barh(y, med * 1000, left=left, color=col, height=0.6)
            drawn.add(part)
            left += med * 1000
    ax.set_yticks(range(len(groups)), [name + seeds_note(len(runs)) for name, runs in groups.items()],
                  fontsize="small")
    ax.invert_yaxis()
    legend(ax, {p: c for p, c in PART_COLORS.items() if p in drawn})
    return fig


def _label_points(fig, ax, points: list[tuple[float, float, str]]) -> None:
    """Label each point beside it, right of it where the label stays inside the axes, else left of it, nudging
    it up or down until it overlaps no label placed before.

    Cells often land on the same memory and accuracy (two methods at one density and quant), and labels
    drawn at a fixed offset then print over each other; a label past the axes' right edge runs into the legend.
    """
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # fixes the layout and the axes limits, so text extents are final
    inside = ax.get_window_extent(renderer)
    placed = []
    for x, y, text in sorted(points, key=lambda p: (-p[1], p[0])):
        for k in range(80):  # offsets 0, +1, -1, +2, -2, ... lines of text, each right then left of the point
            dy = ((k // 2 + 1) // 2) * (1 if (k // 2) % 2 else -1) * 9.0
            dx, ha = (4, "left") if k % 2 == 0 else (-4, "right")
            label = ax.annotate(text, (x, y), xytext=(dx, 3 + dy), textcoords="offset points",
                                fontsize="x-small", va="bottom", ha=ha)
            box = label.get_window_extent(renderer)
            if box.x0 >= inside.x0 and box.x1 <= inside.x1 and not any(box.overlaps(b) for b in placed):
                break
            label.remove()
        else:  # nowhere free: the first place, over whatever is there
            dx, dy = 4, 0.0
            label = ax.annotate(text, (x, y), xytext=(dx, 3), textcoords="offset points", fontsize="x-small",
                                va="bottom")
            box = label.get_window_extent(renderer)
        if dy:
            ax.annotate("", (x, y), xytext=(dx, 3 + dy), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"})
        placed.append(box)


def memory_vs_accuracy(ok: list[CellView], extras: list[str]):
    """A point a configuration: its seeds' median peak against their mean test score, their ranges as bars."""
    cells = [r for r in ok if meaningful(r) and isinstance(r.derived.peak_mib, (int, float))
             and primary_score(r.metrics.get("test_after")) is not None]
    if not cells:
        return None
    groups = configs(cells, extras)
    folded = any(len(runs) > 1 for runs in groups.values())
    title = "Memory against test score after training" + (" (seeds: mean score, median peak, bars their range)"
                                                          if folded else "")
    fig, ax = new_figure(7.5, 4.5, title, "peak memory (MiB)", "test accuracy (%) (F1 for generative tasks)")
    quants = sorted({quant(r) for r in cells}, key=lambda q: (q != "none", q))
    points = []
    for name, runs in groups.items():
        r = runs[0]
        x, xerr = spread([c.derived.peak_mib for c in runs], statistics.median)
        y, yerr = spread([100 * primary_score(c.metrics.get("test_after")) for c in runs], statistics.fmean)
        marker = MARKERS[quants.index(quant(r)) % len(MARKERS)]
        ax.scatter(x, y, color=color(method(r)), marker=marker, s=40, zorder=3)
        if len(runs) > 1:
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor=color(method(r)), elinewidth=1, alpha=0.6,
                        zorder=2)
        points.append((x, y, name + seeds_note(len(runs))))
    ax.margins(0.15)
    # One legend (methods by colour, then quant backends by marker): a second legend added beside the
    # first is left out of the figure's extent and gets cut off.
    methods = sorted({method(r) for r in cells}, key=method_order)
    handles = [Patch(color=color(m), label=m) for m in methods]
    if len(quants) > 1:
        handles += [Line2D([], [], color="black", marker=MARKERS[i % len(MARKERS)], linestyle="",
                           label=f"quant {q}") for i, q in enumerate(quants)]
    ax.legend(handles=handles, fontsize="small", **OUTSIDE)
    _label_points(fig, ax, points)
    return fig


PLOTS = (("memory", "Peak memory per cell", memory_bars),
         ("memory_by_phase", "Peak memory by phase", phase_bars),
         ("step_breakdown", "Step time by part", step_breakdown),
         ("loss", "Training loss vs step", loss_curves),
         ("dev_accuracy", "Dev accuracy vs step", dev_curves),
         ("dev_vs_time", "Dev accuracy vs training seconds", dev_vs_time),
         ("memory_vs_accuracy", "Peak memory vs test accuracy", memory_vs_accuracy))


def write_plots(ok: list[CellView], extras: list[str], folder: Path, linked: set[str] = frozenset()
                ) -> list[tuple[str, str]]:
    """Writes ``<name>.png`` for each plot with data; returns (caption, file name) of those written.

    A plot without data is skipped and any stale PNG of that name (from an earlier render) removed, so the
    folder never shows a plot the markdown does not link. Every file of those names already there must be
    zobench's (``owned.check_plot``; ``linked``: the plots the report being replaced links), checked before
    any is written.
    """
    for name, _, _ in PLOTS:
        check_plot(folder / f"{name}.png", linked)
    written = []
    for name, caption, make in PLOTS:
        path = folder / f"{name}.png"
        fig = make(ok, extras)
        if fig is None:
            path.unlink(missing_ok=True)
            continue
        save_figure(fig, path)
        written.append((caption, path.name))
    return written
