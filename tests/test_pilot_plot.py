"""The lr pilots' figure: each arm's dev score by the suite's rule against its lr, its highest circled (ties to
the smaller lr, as the rule's); drawn and linked by the report where there are pilots, removed where not."""

from __future__ import annotations

from pytest import approx

from zobench.cell.record import CellRecord
from zobench.report import render_report, views
from zobench.report.pilot_plot import NAME, pilot_figure


def _pilot(method, quant, lr, curve, cell_id=None):
    r = CellRecord(cell_id or f"{method}-{quant}-{lr}", status="ok",
                   labels={"method": method, "quant": quant, "stage": "pilot", "lr": lr},
                   config={"method": method, "quant": quant, "lr": lr, "steps": 300})
    r.metrics.set(dev_curve=[{"step": 100 * (i + 1), "accuracy": a} for i, a in enumerate(curve)],
                  best_dev={"accuracy": max(curve)})
    return r


PILOTS = [_pilot("qzo", "nf4-plain", 1e-3, [0.60, 0.55]), _pilot("qzo", "nf4-plain", 1e-4, [0.50, 0.55]),
          _pilot("qzo", "nf4-plain", 1e-2, [0.52, 0.51]),
          _pilot("quzo", "int8", 1e-5, [0.70, 0.70]), _pilot("quzo", "int8", 1e-4, [0.70, 0.70]),
          _pilot("quzo", "int8", "0.1", [0.9, 0.9]), _pilot("quzo", "int8", 1e-3, [0.9, float("nan")])]


def _lines(fig):
    """{label: (xs, ys)} of the arms' lines, and [(x, y)] of the circles (unlabelled one-point lines)."""
    arms, circles = {}, []
    for line in fig.axes[0].get_lines():
        xs, ys = list(line.get_xdata()), list(line.get_ydata())
        if line.get_label().startswith("_"):
            circles.append((xs[0], ys[0]))
        else:
            arms[line.get_label()] = (xs, ys)
    return arms, circles


def test_each_arm_is_its_pilots_score_by_the_rule_against_lr_and_its_highest_is_circled():
    recs = views(PILOTS)
    arms, circles = _lines(pilot_figure(recs, "last"))
    # the lr that is not a number and the score that is not finite are no points (a results file is data)
    assert arms == {"qzo/nf4-plain": ([1e-4, 1e-3, 1e-2], approx([55.0, 55.0, 51.0])),
                    "quzo/int8": ([1e-5, 1e-4], approx([70.0, 70.0]))}
    assert sorted(circles) == [(1e-5, approx(70.0)), (1e-4, approx(55.0))]  # ties: the smaller lr, as the rule's
    arms, circles = _lines(pilot_figure(recs, "best"))
    assert arms["qzo/nf4-plain"] == ([1e-4, 1e-3, 1e-2], approx([55.0, 60.0, 52.0]))
    assert (1e-3, approx(60.0)) in circles
    assert pilot_figure(views([PILOTS[5]]), "best") is None


def test_the_report_links_the_plot_while_pilots_exist_and_removes_it_after(tmp_path):
    out = tmp_path / "r.md"
    text = render_report(PILOTS, out).read_text()
    assert f"(r_plots/{NAME})" in text and (tmp_path / "r_plots" / NAME).read_bytes().startswith(b"\x89PNG")
    assert "| quzo | int8 | - | - | 90.0 (100) -> 90.0 (200) |" in text  # an lr not a number: a dash, no crash
    cell = CellRecord("c", status="ok", labels={"method": "qzo", "quant": "nf4-plain"},
                      config={"method": "qzo", "quant": "nf4-plain", "lr": 1e-3, "steps": 1000})
    text = render_report([cell], out).read_text()
    assert NAME not in text and not (tmp_path / "r_plots" / NAME).exists()
