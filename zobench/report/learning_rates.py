"""The report's learning-rate sections: each cell's lr chosen on dev by the pilot, with what its own run did
after (dev falling, the training loss rising), and the pilot's progress while it runs."""

from __future__ import annotations

import math

from zobench.analysis.design import half_width_95
from zobench.cell.record import CellRecord
from zobench.report.cells import CellView, setting, varying_axes
from zobench.report.table import DASH, Column, pct_points, section
from zobench.spec.claims import finite_number


def lr_table(ok: list[CellView], pilots: list[CellView], extras: list[str]) -> list[str]:
    chosen = [r for r in ok if r.lr_choice]
    if not chosen:
        return []

    def tried(r):
        c = r.lr_choice
        return ", ".join(f"{lr:g}: {pct_points(d) if d is not None else 'failed'}"
                         for lr, d in zip(c["grid"], c["dev"]))

    cols: list[Column] = [("lr: dev % after the pilot", tried),
                          ("chosen lr", lambda r: f"{r.lr_choice['chosen']:g}{lr_caveat(r.lr_choice)}"
                           if r.lr_choice.get("chosen") else "none (kept the configured lr)"),
                          ("the run's dev %: best (step) -> last (step)", run_dev),
                          ("the run's training loss", loss_rise)]
    steps = chosen[0].lr_choice["pilot_steps"]
    rule = chosen[0].lr_choice.get("by", "best dev score")  # the suite's rule: a pilot's best or last dev score
    intro = (f"Each cell's learning rate was chosen on dev, never on test: every lr of its grid ran "
             f"{steps} steps ({len(pilots)} pilot cells), and the cell ran with the lr whose pilot had the "
             f"highest {rule} (ties: the smaller lr). A choice at the grid's edge may have a better lr outside "
             f"the grid; where dev did not move across the grid the choice says nothing. The last column is the "
             f"cell's own run: a pilot of a few steps can choose an lr that diverges over many more, which shows as "
             f"dev falling or as the training loss rising above its start (the mean loss of the run's first tenth "
             f"against each later tenth's, beyond twice the noise of the difference).")
    return section("Learning rates chosen on dev", intro, cols, chosen, extras, n_text=2)


def run_dev(rec: CellRecord) -> str:
    """The cell's own dev curve after the pilot: its best and its last point, and whether it fell by more
    than the dev set's noise (a 95% binomial half-width at the best score): a pilot of a few steps can pick
    an lr that diverges over the whole run."""
    curve = [p for p in rec.metrics.get("dev_curve") or [] if p.get("accuracy") is not None]
    if not curve:
        return "-"
    best = max(curve, key=lambda p: (p["accuracy"], -p["step"]))
    last = curve[-1]
    text = f"{pct_points(best['accuracy'])} ({best['step']}) -> {pct_points(last['accuracy'])} ({last['step']})"
    n, acc = rec.metrics.get("n_dev"), best["accuracy"]
    if n and acc - last["accuracy"] > half_width_95(acc, n):
        text += " (fell by more than dev noise)"
    return text


def loss_rise(rec: CellRecord, parts: int = 10) -> str:
    """The training loss over the run in tenths: its first tenth's mean, its last tenth's, and the highest later
    tenth when that rose above the first by more than twice the standard error of the difference (the first
    tenth's per-step spread): the lr is too large for some stretch of the run."""
    losses = [x for x in rec.metrics.get("loss_curve") or [] if isinstance(x, (int, float)) and math.isfinite(x)]
    if len(losses) < 2 * parts:
        return "-"
    k = len(losses) // parts
    means = [sum(losses[i * k:(i + 1) * k]) / k for i in range(parts)]
    first = losses[:k]
    sd = math.sqrt(sum((x - means[0]) ** 2 for x in first) / (k - 1))
    text = f"{means[0]:.2f} -> {means[-1]:.2f}"
    worst = max(range(1, parts), key=lambda i: means[i])
    if means[worst] - means[0] > 2 * math.sqrt(2) * sd / math.sqrt(k):
        steps = rec.metrics.get("steps_done") or len(losses)
        lo, hi = round(steps * worst / parts) + 1, round(steps * (worst + 1) / parts)
        text += f" (rose above its start: {means[worst]:.2f} at steps {lo}-{hi})"
    return text


def lr_caveat(choice: dict) -> str:
    """What the pilot could not tell: dev equal at every lr, or the best lr at an end of the grid."""
    scores = [d for d in choice.get("dev") or [] if d is not None]
    grid = choice.get("grid") or []
    if len(grid) < 2 or not scores:
        return ""
    if len(scores) == len(grid) and max(scores) == min(scores):
        return " (dev equal at every lr)"
    if choice.get("chosen") in (min(grid), max(grid)):
        return " (grid edge)"
    return ""


def pilot_progress(ok: list[CellView], pilots: list[CellView]) -> list[str]:
    """While the lr pilot runs (no cell has its lr yet): each finished pilot cell and its dev score."""
    if not pilots or any(r.lr_choice for r in ok):
        return []
    cols: list[Column] = [("lr", lambda r: f"{lr:g}" if finite_number(lr := setting(r, "lr")) else DASH),
                          ("pilot's dev %: best (step) -> last (step)",
                           lambda r: run_dev(r) if r.ok else str(r.status)),
                          ("steps", lambda r: str(setting(r, "steps"))),
                          ("wall s", lambda r: f"{r.machine_s:.0f}" if r.machine_s else "-")]
    cpu = any(r.cpu_s is not None for r in pilots)  # records from before phases kept it have none
    if cpu:
        cols.append(("CPU s", lambda r: "-" if r.cpu_s is None else f"{r.cpu_s:.0f}"))
    intro = (f"The learning-rate pilot is running: {len(pilots)} pilot cells have finished. Each tries one lr "
             f"of its method's grid on dev (never on test); the cells run once every pilot of their grid is done, "
             "with the lr whose pilot scored highest on dev by the suite's rule (`lr_pilot.by`: its best or its "
             "last evaluation). "
             "Wall seconds include any time the run was stopped or shared the machine; a resumed cell's earlier "
             "runs count up to their last checkpoint where its record keeps them (records of zobench before "
             "that count the last run only)" + ("; CPU seconds are the cell's own work." if cpu else "."))
    extras = [a for a in varying_axes(pilots) if a != "lr"]
    return section("Learning-rate pilot (in progress)", intro, cols, pilots, extras, n_text=1)
