"""The claims' forest plot (zobench/report/claims_plot.py): every claim's intervals where the verdicts put
them, coloured by verdict, its margin marked; the report links it under the claims table, and a report
without claims has none (a stale one removed)."""

from __future__ import annotations

import math

import pytest
from claims_runs import claims, write_results
from matplotlib.colors import to_hex

from zobench.analysis.stats import Result
from zobench.analysis.verdicts import verdicts
from zobench.report import render_report
from zobench.report.claims_plot import VERDICT_COLORS, claims_figure
from zobench.results import load_records


def lines_of(ax, width: float) -> list:
    return [line for line in ax.get_lines() if line.get_linewidth() == width]


def test_each_claims_intervals_and_margin_are_drawn_where_its_verdict_reads_them(tmp_path):
    results = write_results(tmp_path)
    decision = verdicts(load_records(results), claims(), results.parent)
    fig = claims_figure(decision.results, {"s-beats-r": "sensitive beats random"})
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[::-1] == ["sensitive beats random", "s-like-f"]  # declared order, top to bottom
    by_row = {round(line.get_ydata()[0]): line for line in lines_of(ax, 5)}  # the Holm-adjusted intervals
    for y, r in enumerate(reversed(decision.results)):
        thick = by_row[y]
        assert list(thick.get_xdata()) == pytest.approx([100 * r.adj_low, 100 * r.adj_high])
        assert to_hex(thick.get_color()) == VERDICT_COLORS[r.verdict]
        ticks = [line.get_xdata()[0] for line in ax.get_lines() if line.get_marker() == "|"
                 and line.get_ydata()[0] == y]
        assert ticks == pytest.approx([100 * r.margin if r.kind == "superiority" else -100 * abs(r.margin)])


def test_a_speed_claim_gets_a_ratio_panel_and_an_interval_to_infinity_ends_at_its_edge():
    speed = Result("fast", "faster_to_target", 0.0, math.log(2.0), math.log(1.2), math.inf, 0.05, 0.05,
                   math.log(1.1), math.inf, 0.01, 0.01, "holds", (5, 5), None, "seed bootstrap")
    acc = Result("acc", "non_inferiority", -0.08, 0.01, -0.02, 0.04, 0.05, 0.05, -0.03, 0.05, 0.02, 0.02,
                 "holds", (5, 5), 600, "two-level bootstrap")
    fig = claims_figure([acc, speed], {}, "interim")
    assert fig.get_suptitle().endswith("(interim)")  # marked as the table marks its verdicts
    points, ratio = fig.axes[:2]
    assert ratio.get_xscale() == "log" and points.get_xscale() == "linear"
    (thick,) = lines_of(ratio, 5)
    lo, hi = ratio.get_xlim()
    assert thick.get_xdata()[0] == pytest.approx(1.1) and thick.get_xdata()[1] == pytest.approx(hi)
    assert claims_figure([], {}) is None


def test_a_claim_without_an_estimate_is_said_so_and_a_plot_of_none_is_not_drawn():
    def acc(claim, estimate):
        return Result(claim, "non_inferiority", 0.10, estimate, -0.02, 0.04, 0.05, 0.05, -0.03, 0.05, 0.02, 0.02,
                      "not resolved", (3, 0 if math.isnan(estimate) else 3), 600, "two-level bootstrap")

    assert claims_figure([acc("a", math.nan), acc("b", math.nan)], {}) is None  # margins alone: the table says it
    fig = claims_figure([acc("a", 0.01), acc("b", math.nan)], {})
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == ["no estimate yet"]
    assert ax.texts[0].get_position()[1] == 0  # b's row, drawn last (the bottom)


def test_the_report_links_the_plot_under_its_claims_and_a_report_without_claims_has_none(tmp_path):
    results = write_results(tmp_path)
    out = tmp_path / "rep" / "t.md"
    text = render_report(load_records(results), out, results_dir=results.parent).read_text()
    claims_part = text.split("## Claims")[1].split("\n## ")[0]
    assert "![Claims: each interval against its margin](t_plots/claims.png)" in claims_part
    png = out.parent / "t_plots" / "claims.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = load_records(results)
    for r in plain:
        r.claims = None
    text = render_report(plain, out, results_dir=results.parent).read_text()
    assert "## Claims" not in text and not png.exists()
