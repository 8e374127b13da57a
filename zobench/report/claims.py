"""The claims section of a report: each declared claim with its interval, margin, p-values and verdict
(``zobench.analysis.verdicts``); the runs left out and why; verdicts under earlier declarations, labelled."""

from __future__ import annotations

import math

from zobench.analysis.stats import Result
from zobench.analysis.verdicts import Decision


def has_estimate(r: Result) -> bool:
    """Whether a claim's verdict came with an estimate (none while an arm has no usable run)."""
    return r.estimate is not None and not (isinstance(r.estimate, float) and math.isnan(r.estimate))


def on_report_scale(x: float | None, kind: str) -> float:
    """A claim's number as the report reads it: points for an accuracy difference, the time ratio b/a for a
    speed claim (its log ratio's exp); NaN where there is none."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return math.nan
    return math.exp(x) if kind == "faster_to_target" else 100 * x


def difference(x: float, kind: str) -> str:
    """An accuracy difference in points; a speed claim's log time ratio as the ratio it stands for."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if kind == "faster_to_target":
        return "inf" if x == math.inf else "0" if x == -math.inf else f"{math.exp(x):.2f}x"
    return f"{100 * x:+.1f}"


def interval(lo: float, hi: float, kind: str) -> str:
    return f"[{difference(lo, kind)}, {difference(hi, kind)}]"


def margin_rule(r: Result) -> str:
    if r.kind == "faster_to_target":
        return f"b/a > {math.exp(r.margin):.2f}x"
    sign = {"superiority": "a - b >", "non_inferiority": "a - b > -", "equivalence": "|a - b| <"}[r.kind]
    return f"{sign}{100 * abs(r.margin):.1f} pts" if r.kind != "superiority" else f"{sign} {100 * r.margin:.1f} pts"


def rows(results: list[Result], names: dict[str, str], interim: str = "") -> list[str]:
    out = ["| claim | kind | a - b | interval (1 - alpha) | interval Holm-adjusted (level) | margin | p / p Holm | "
           "verdict | seeds a, b | examples |", "|:---|:---|---:|:---|:---|:---|:---|:---|:---|---:|"]
    for r in results:
        level = f"{100 * (1 - r.alpha_adjusted):.2f}%" if not math.isnan(r.alpha_adjusted) else "-"
        out.append(f"| {names.get(r.claim, r.claim)} | {r.kind.replace('_', ' ')} | {difference(r.estimate, r.kind)} "
                   f"| {interval(r.ci_low, r.ci_high, r.kind)} | {interval(r.adj_low, r.adj_high, r.kind)} "
                   f"({level}) | {margin_rule(r)} | {r.p_value:.3g} / {r.p_adjusted:.3g} | **{r.verdict}**"
                   f"{f' ({interim})' if interim else ''} | "
                   f"{r.n_seeds[0]}, {r.n_seeds[1]} | {r.n_examples or '-'} |")
    return out


def grouped(listed: list) -> list[str]:
    """One bullet a run and reason, with every claim and arm it is listed under, in the order first met: a
    failed run of an arm that several claims share (the reference arm) is said once, not once a claim."""
    where: dict[str, list[str]] = {}
    for e in listed:
        where.setdefault(e.what, []).append(e.where)
    return [f"- {what} (in {'; '.join(w)})" for what, w in where.items()]


def verdict_label(missing: int | None) -> str:
    """What marks every verdict of a report: interim while cells are missing, unknown without the suite."""
    return "interim" if missing else "suite not read" if missing is None else ""


def claims_section(decision: Decision | None, names: dict[str, str], dirty: list[str],
                   missing: int | None = 0, plot: str | None = None) -> list[str]:
    """``missing``: the suite's cells without a record yet; then every verdict is marked interim. None: the
    suite's file could not be read, so no one can tell; every verdict is marked so. ``plot``: the claims'
    forest plot (``report.claims_plot``), shown under the table."""
    if decision is None:
        return []
    lines = ["## Claims", "",
             f"Declared in the suite before the run (claims hash `{decision.claims_hash[:12]}`). Accuracy claims "
             f"are decided from the per-example predictions beside the records: test examples resampled (one "
             f"resample shared by every seed and arm, so the arms are paired), the seed level drawn with t tails "
             f"from the seeds' spread; a speed claim from the runs' dev curves in its declared clock, seeds "
             f"resampled. Holm over the suite's claims (a claim with under 2 seeds an arm enters it with p 1). A "
             f"verdict reads the Holm-adjusted interval against the declared margin (its level is the widest that "
             f"resolves exactly when Holm's adjusted p is at most alpha: not a simultaneous interval); accuracy "
             f"differences are in points, speed as the ratio of b's time to a's (`zobench/analysis/verdicts.py`, "
             f"`zobench/analysis/stats.py`, `zobench/analysis/speed.py`).", ""]
    label = verdict_label(missing)
    if missing:
        lines += [f"**Interim:** {missing} of the suite's cells have no record yet. These verdicts are of the runs so "
                  f"far; the suite fixed its seeds before the run, and reading the verdicts as the runs accumulate "
                  f"and stopping at the first that holds would raise the error rate above the declared alpha. A "
                  f"verdict is final when every declared cell is in.", ""]
    elif missing is None:
        lines += ["**Not known to be final:** the suite's file could not be read (above), so whether every declared "
                  "cell is in cannot be told; a verdict is final only when every declared cell is in.", ""]
    lines += rows(decision.results, names, label) + [""]
    methods = sorted({r.method for r in decision.results})
    lines += [f"- {m}" for m in methods] + [""]
    if plot:  # under the table and its notes: the same verdicts, drawn
        lines += [f"![Claims: each interval against its margin]({plot})", ""]
    lines += resolution_rows(decision, names)
    if decision.excluded:
        lines += ["Runs left out (a failed run is a failed run, not a property of its method):", ""]
        lines += grouped(decision.excluded) + [""]
    if decision.counted:
        lines += ["Failed runs counted in their arms at what they measured (the suite declares "
                  "`failed_if.count_in_arm`: at its settings, failing to learn is part of what a method does):", ""]
        lines += grouped(decision.counted) + [""]
    if dirty:
        lines += ["Records from a tree whose code differed from its commit (`git.dirty`): "
                  + ", ".join(dirty) + ".", ""]
    for h, results in decision.earlier.items():
        lines += [f"### As declared earlier (claims hash `{h[:12]}`)", "",
                  "Some records were made while the suite declared these claims differently; their verdicts "
                  "on the same records:", ""] + rows(results, names, label) + [""]
    if decision.earlier_undecided:
        lines += [f"{len(decision.earlier_undecided)} more earlier declarations (claims hashes "
                  f"{', '.join(f'`{h[:12]}`' for h in decision.earlier_undecided[:10])}"
                  f"{', ...' if len(decision.earlier_undecided) > 10 else ''}) are not decided here "
                  f"(each would read every record again).", ""]
    return lines


def resolution_rows(decision: Decision, names: dict[str, str]) -> list[str]:
    """What the design resolves, for each accuracy claim with 2+ seeds paired (``Decision.resolutions``):
    where the variance of its difference comes from, and the interval's expected half-width now, at twice the
    seeds and with any number of seeds on the same test set."""
    results = {r.claim: r for r in decision.results}
    rows = []
    for cid, res in decision.resolutions.items():
        r = results.get(cid)
        alpha = r.alpha if r is not None else 0.05
        s, e = res.n_seeds, res.n_examples
        shares = " / ".join(f"{100 * v:.0f}%" for v in res.shares())
        if res.seed_clamped:
            shares += " (seeds: at or below 0)"
        seeds = f"{s} x {e}" + ("" if r is None or tuple(r.n_seeds) == (s, s) else
                                f" (the verdict reads {r.n_seeds[0]} and {r.n_seeds[1]} seeds)")
        rows.append(f"| {names.get(cid, cid)} | {seeds} | {shares} | "
                    + " | ".join(f"{100 * res.half_width(n, alpha=alpha):.1f}" for n in (s, 2 * s, math.inf)) + " |")
    if not rows:
        return []
    clamped = (". Seeds \"at or below 0\": those seeds agreed more than their per-example noise predicts, the seed "
               "component is taken as 0, and its projections may be optimistic"
               if any(res.seed_clamped for res in decision.resolutions.values()) else "")
    return ["What this design resolves, from the claims' own runs (`zobench/analysis/design.py`: the variance of "
            "each paired difference split by two-way ANOVA into seeds, test examples and each run's own noise on "
            "each example, the crossed model the interval uses; a projection from few seeds is rough). Half-widths "
            "in points at each claim's unadjusted level; `scripts/resolution.py` gives them at Holm's level and the "
            f"seeds a margin needs{clamped}:", "",
            "| claim | seeds paired x test examples | variance now: seeds / examples / runs | half-width now | at "
            "twice the seeds | any number of seeds |",
            "|:---|:---|:---|---:|---:|---:|", *rows, ""]
