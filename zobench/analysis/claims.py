"""SensZOQ's claims (arXiv 2406.02913), each decided from a set of records with its noise level stated.

    sensitive > random      ZO on the 0.1% most sensitive weights beats 0.1% random ones at equal steps
    sensitive >= full       ... matches or beats full ZO at equal steps
    sensitive faster        ... reaches full ZO's best dev accuracy in fewer training seconds
    nf4 <= 1 point          ... loses at most 1 point of test accuracy on NF4 weights

Test accuracy is taken at the best dev step (``test_best``, MeZO's selection; records without dev-based
selection are not judged) and averaged over seeds. Two sides are compared on the seeds both have run (all of
each side's seeds when they share none), so a seed one side has not run yet does not tilt the difference; the
left-out seeds still count in the spread between seeds. The noise of a difference is the larger of a 95% binomial interval on the test sets
(1.96 x the standard error of the difference of two accuracies on n examples) and the spread between
seeds. "Beats" holds or fails only when the difference is beyond that noise, else it is "not resolved";
"matches or beats" and "at most 1 point" hold when the measured difference satisfies them and fail only
when it misses them by more than the noise. The speed claim compares mean dev curves: it holds or fails on the
seconds when sensitive reaches full ZO's best dev score; when it never does, it fails only if it stays
below by more than the noise of a difference of two dev accuracies (the best point of a noisy curve is
itself noisy), else it is not resolved. Every verdict comes with its numbers; a claim that does not
hold is a result too.

Training seconds depend on what else the machine ran. Cells time a plain forward of their own batch beside
their steps (``forward_ref_s``), so a cell's seconds divided by that forward's median are its time in
"reference forwards", which a busy machine stretches on both sides of the ratio alike. When the two sides
trained beside different amounts of other work, the speed claim is decided in those units instead of seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zobench.analysis.derive import latest_by_cell
from zobench.cell.record import CellRecord
from zobench.measure.load import LOADED_CPUS

HOLDS, FAILS, OPEN, MISSING = "holds", "does not hold", "not resolved", "not measured"


@dataclass
class Verdict:
    claim: str
    verdict: str
    numbers: str
    noise: str


@dataclass
class Arm:
    """The records of one method (and quant) over seeds."""

    runs: list[CellRecord]
    all_runs: list[CellRecord] | None = None  # every seed's runs when ``runs`` is the shared seeds only

    @property
    def tests(self) -> list[float]:
        return [t for r in self.runs if (t := test_accuracy(r)) is not None]

    @property
    def mean(self) -> float:
        return sum(self.tests) / len(self.tests)

    @property
    def n_test(self) -> int:
        return min(int(r.metrics.get("n_test") or 0) for r in self.runs)

    @property
    def other_cpus(self) -> float | None:
        """Mean CPUs busy with other work while these runs trained (None when not recorded)."""
        loads = [r.phases["train"].other_cpus for r in self.runs if "train" in r.phases]
        loads = [x for x in loads if x is not None]
        return sum(loads) / len(loads) if loads else None

    @property
    def spread(self) -> float:
        tests = [t for r in self.all_runs or self.runs if (t := test_accuracy(r)) is not None]
        return max(tests) - min(tests) if len(tests) > 1 else 0.0

    @property
    def seeds(self) -> list:
        return [r.config.get("seed") for r in self.runs]

    def on_seeds(self, seeds: set) -> Arm:
        """The runs of these seeds, keeping every run's test accuracy for the seed spread."""
        return Arm([r for r in self.runs if r.config.get("seed") in seeds], all_runs=self.all_runs or self.runs)


def test_accuracy(rec: CellRecord) -> float | None:
    """Test accuracy at the best dev step: the claims are only judged on dev-selected runs."""
    return (rec.metrics.get("test_best") or {}).get("accuracy")


def _arms(records: list[CellRecord]) -> dict[tuple[str, str], Arm]:
    arms: dict[tuple[str, str], Arm] = {}
    for r in latest_by_cell(records):
        if r.ok and r.labels.get("stage") is None and r.accuracy_meaningful and test_accuracy(r) is not None \
                and r.metrics.get("n_test"):
            key = (r.method, str(r.config.get("quant", "none")))
            arms.setdefault(key, Arm([])).runs.append(r)
    return arms


def half_width_95(p: float, n: int) -> float:
    """The 95% binomial half-width of an accuracy ``p`` measured on ``n`` examples (normal approximation)."""
    return 1.96 * math.sqrt(p * (1 - p) / max(n, 1))


def _paired(a: Arm, b: Arm, names: tuple[str, str]) -> tuple[Arm, Arm, str]:
    """Both arms on the seeds both have run, with a note naming what was left out ("" when nothing was)."""
    shared = set(a.seeds) & set(b.seeds)
    if not shared or (set(a.seeds) == shared and set(b.seeds) == shared):
        return a, b, ""
    left = [f"{name}'s seed{'s' if len(extra) > 1 else ''} {', '.join(map(str, sorted(extra)))}"
            for name, arm in zip(names, (a, b)) if (extra := set(arm.seeds) - shared)]
    note = (f"on the seed{'s' if len(shared) > 1 else ''} both have run ({', '.join(map(str, sorted(shared)))}); "
            f"{' and '.join(left)} left out of the means")
    return a.on_seeds(shared), b.on_seeds(shared), note


def half_width_95_difference(p: float, n: int, q: float, m: int) -> float:
    """The 95% half-width of the difference of two accuracies, ``p`` on ``n`` examples and ``q`` on ``m``."""
    return 1.96 * math.sqrt(p * (1 - p) / max(n, 1) + q * (1 - q) / max(m, 1))


def _noise(a: Arm, b: Arm) -> float:
    return max(half_width_95_difference(a.mean, a.n_test, b.mean, b.n_test), a.spread, b.spread)


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}" if x else "+0.0"


def _difference(claim: str, a: Arm | None, b: Arm | None, names: tuple[str, str], at_least: float | None) -> Verdict:
    if a is None or b is None:
        return Verdict(claim, MISSING, "-", "-")
    a, b, paired = _paired(a, b, names)
    d, noise = a.mean - b.mean, _noise(a, b)
    numbers = (f"{names[0]} {100 * a.mean:.1f}%, {names[1]} {100 * b.mean:.1f}% (difference {_pts(d)} points; "
               f"{len(a.tests)} and {len(b.tests)} seeds, {a.n_test} test examples{'; ' + paired if paired else ''})")
    if at_least is None:  # a beats b
        verdict = HOLDS if d > noise else FAILS if d < -noise else OPEN
    else:  # a is at least b - at_least
        verdict = FAILS if d + at_least < -noise else HOLDS if d + at_least >= 0 else OPEN
    return Verdict(claim, verdict, numbers, f"+-{100 * noise:.1f} points")


def _forward_s(rec: CellRecord) -> float | None:
    """Median seconds of the cell's in-cell reference forward (None when it timed none)."""
    stats = rec.metrics.forward_ref_s
    return stats.median if stats is not None and stats.median > 0 else None


def _mean_curve(arm: Arm) -> list[tuple[int, float, float, float | None]]:
    """(step, mean dev score, mean training seconds, mean training time in reference forwards) at each
    evaluation all seeds have; the last is None unless every run timed its reference forward."""
    curves = [[p for p in r.metrics.get("dev_curve") or [] if p.get("accuracy") is not None] for r in arm.runs]
    refs = [_forward_s(r) for r in arm.runs]
    n = min((len(c) for c in curves), default=0)

    def mean(xs):
        return sum(xs) / len(xs)

    return [(curves[0][i]["step"], mean([c[i]["accuracy"] for c in curves]),
             mean([c[i].get("train_s", 0.0) for c in curves]),
             mean([c[i].get("train_s", 0.0) / f for c, f in zip(curves, refs)]) if all(refs) else None)
            for i in range(n)]


def _faster(sens: Arm | None, full: Arm | None) -> Verdict:
    claim = "sensitive 0.1% reaches full ZO's best dev accuracy in fewer training seconds"
    if sens is None or full is None:
        return Verdict(claim, MISSING, "-", "-")
    sens, full, paired = _paired(sens, full, ("sensitive", "full ZO"))
    s, f = _mean_curve(sens), _mean_curve(full)
    if not s or not f:
        return Verdict(claim, MISSING, "no dev curves (eval_every)", "-")
    target_step, target, t_full, u_full = max(f, key=lambda p: (p[1], -p[0]))
    reached = next((p for p in s if p[1] >= target), None)
    n_dev = min(int(r.metrics.get("n_dev") or 0) for r in sens.runs + full.runs)
    noise = f"dev accuracy on {n_dev} examples: +-{100 * half_width_95(target, n_dev):.1f} points"
    if reached is None:
        return _never_reached(claim, s, f, (target_step, target, t_full), n_dev, paired, noise)
    verdict = HOLDS if reached[2] < t_full else FAILS
    numbers = (f"full ZO's best dev {100 * target:.1f}% at step {target_step} after {t_full:.0f} s; "
               f"sensitive reaches it at step {reached[0]} after {reached[2]:.0f} s")
    u_sens = reached[3]
    if u_sens is not None and u_full is not None:
        numbers += f" ({u_sens:.0f} and {u_full:.0f} reference forwards)"
    load_s, load_f = sens.other_cpus, full.other_cpus
    if load_s is not None and load_f is not None:
        numbers += f" (other work on the machine while training: {load_s:.2f} and {load_f:.2f} CPUs)"
        # Other work only slows a run: a win is only in doubt when the winner ran on the quieter machine.
        quieter_winner = load_f - load_s if verdict == HOLDS else load_s - load_f
        if quieter_winner >= LOADED_CPUS:
            if u_sens is not None and u_full is not None:
                verdict = HOLDS if u_sens < u_full else FAILS
                numbers += "; the loads differ, so the reference forwards decide"
            else:
                verdict = OPEN
                numbers += "; the faster side ran beside less other work, so the seconds do not decide it"
    if paired:
        numbers += f" ({paired})"
    return Verdict(claim, verdict, numbers, noise)


def _never_reached(claim: str, s: list, f: list, full_best: tuple[int, float, float], n_dev: int, paired: str,
                   noise: str) -> Verdict:
    """Sensitive's mean dev curve stays below full ZO's best: the claim fails when it stays below by more
    than the noise of a difference of two dev accuracies, else it is not resolved (the best of a noisy
    curve is itself noisy). Either way, the seconds each side took to reach the lower of the two bests."""
    target_step, target, t_full = full_best
    best = max(p[1] for p in s)
    noise_d = half_width_95_difference(target, n_dev, best, n_dev)
    short = target - best
    verdict = FAILS if short > noise_d else OPEN
    s_low = next(p for p in s if p[1] >= best)
    f_low = next(p for p in f if p[1] >= best)
    numbers = (f"full ZO's best dev {100 * target:.1f}% (step {target_step}, {t_full:.0f} s); sensitive's best "
               f"{100 * best:.1f}% never reaches it ({100 * short:.1f} points short, "
               f"{'beyond' if verdict == FAILS else 'inside'} the noise); to sensitive's best "
               f"{100 * best:.1f}%: sensitive {s_low[2]:.0f} s (step {s_low[0]}), full ZO {f_low[2]:.0f} s "
               f"(step {f_low[0]})")
    if paired:
        numbers += f" ({paired})"
    return Verdict(claim, verdict, numbers, f"{noise}; of a difference of two: +-{100 * noise_d:.1f} points")


def verdicts(records: list[CellRecord]) -> list[Verdict]:
    """One verdict per claim; empty when the records hold none of the methods the claims compare."""
    arms = _arms(records)
    sens, rand, full = arms.get(("sensitive", "none")), arms.get(("random", "none")), arms.get(("full", "none"))
    nf4 = arms.get(("sensitive", "nf4"))
    if sens is None:
        return []
    return [
        _difference("sensitive 0.1% beats random 0.1% at equal steps", sens, rand, ("sensitive", "random"), None),
        _difference("sensitive 0.1% matches or beats full ZO at equal steps", sens, full, ("sensitive", "full"), 0.0),
        _faster(sens, full),
        _difference("sensitive 0.1% on NF4 weights loses at most 1 point against float32", nf4, sens,
                    ("NF4", "float32"), 0.01),
    ]
