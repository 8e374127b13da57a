"""Before and around the statistics: what a design can resolve, and which runs count at all.

``min_detectable_difference`` sizes a design (seeds per arm, test examples) before the run, so that margins
are declared from it rather than from the results; ``resolution`` says afterwards, from a claim's own
per-example data, what the design resolved and what more seeds or test examples would. ``failed_run``
applies a suite's declared ``failed_if`` rule: a run that did not learn is excluded from its arm and
reported as failed, never averaged in as if its method had done that badly (nor left out silently: the
caller lists it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from zobench.analysis.stats import interaction_ms
from zobench.spec.claims import FailedIf


@dataclass(frozen=True)
class Detectable:
    difference: float  # the smallest true a - b that the interval puts above 0 with the given power
    se: float          # standard error of the difference of the two arms' mean accuracies
    df: float          # the degrees of freedom of the interval's t tails: seeds per arm - 1
    method: str


def min_detectable_difference(seed_sd: float, n_seeds: int, n_examples: int, accuracy: float, *,
                              alpha: float = 0.05, power: float = 0.8, correlation: float = 0.0,
                              seed_sd_b: float | None = None, accuracy_b: float | None = None) -> Detectable:
    """The minimum detectable difference of mean test accuracy between two arms of ``n_seeds`` seeds each,
    all scored on the same ``n_examples`` test examples.

    Model: each arm's mean accuracy has variance seed_sd^2 / n_seeds (between seeds; seed_sd as measured,
    e.g. the sd of per-seed test accuracies) plus p (1 - p) / n_examples (the test set as a sample of the
    task: the same for every seed, so it does not shrink with seeds). The two arms' seed effects are taken as
    independent; their per-example correctness has correlation ``correlation`` (same examples, so it is
    usually positive: the difference is then less noisy), entering as -2 rho sqrt(p_a q_a p_b q_b) / n.
    The measured seed sd already holds some example noise, so the model errs large, i.e. safe for margins.
    The interval (``stats.accuracy_difference``) gives the whole difference t tails with the seed level's
    n_seeds - 1 df (seeds paired), so the same df here; it is two-sided at 1 - alpha (a holds needs its
    lower bound above the margin), so MDE = (t_{df, 1 - alpha/2} + t_{df, power}) * se, the usual
    normal-theory formula with t quantiles. Pass alpha / k for the first step of Holm over k claims (the
    strictest level any claim faces).
    """
    sd_b = seed_sd if seed_sd_b is None else seed_sd_b
    p_b = accuracy if accuracy_b is None else accuracy_b
    if n_seeds < 2 or n_examples < 2 or not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError("needs at least 2 seeds and 2 examples, alpha and power in (0, 1)")
    var_seed = (seed_sd ** 2 + sd_b ** 2) / n_seeds
    qa, qb = accuracy * (1 - accuracy), p_b * (1 - p_b)
    var_ex = max(qa + qb - 2 * correlation * math.sqrt(qa * qb), 0.0) / n_examples
    se = math.sqrt(var_seed + var_ex)
    df = n_seeds - 1.0
    mde = (sps.t.isf(alpha / 2, df) + sps.t.ppf(power, df)) * se
    method = (f"difference of two means: seed sd {seed_sd:.4f}/{sd_b:.4f} over {n_seeds} seeds, binomial "
              f"p={accuracy:.3f}/{p_b:.3f} over {n_examples} examples, example correlation {correlation:.2f}; "
              f"two-sided alpha {alpha:.4g}, power {power:.2f}, t with {df:.0f} df")
    return Detectable(float(mde), se, float(df), method)


@dataclass(frozen=True)
class Resolution:
    """What a paired design of two arms resolves, measured on its own data: the variance components of the
    paired difference a - b under the crossed seeds x examples model the claims' interval uses
    (``stats.accuracy_difference``): var(mean difference) = seed / S + example / E + interaction / (S E).

    ``seed``: how much a seed moves one arm's accuracy against the other's (the difference of two runs on
    infinitely many examples); ``example``: how much test examples differ in a - b (the test set as a sample
    of the task; it does not shrink with seeds); ``interaction``: one pair of runs' own noise on one example.
    Estimated by two-way ANOVA on the (seeds, examples) table of paired differences (each clamped at 0); the
    seed component has S - 1 degrees of freedom, so a projection from few seeds is rough."""

    seed: float
    example: float
    interaction: float
    n_seeds: int
    n_examples: int

    @property
    def seed_clamped(self) -> bool:
        """The seed component's estimate came out at or below 0 and was taken as 0 (the seeds agreed more than
        their per-example noise predicts): a projection to more seeds leaves out a seed spread these seeds
        could not show."""
        return self.seed == 0

    def variance(self, n_seeds: float, n_examples: int | None = None) -> float:
        e = self.n_examples if n_examples is None else n_examples
        if math.isinf(n_seeds):
            return self.example / e
        return self.seed / n_seeds + self.example / e + self.interaction / (n_seeds * e)

    def shares(self) -> tuple[float, float, float]:
        """The fractions of the variance now (at the measured seeds and examples) that come from the seeds, the
        test examples and each run's noise on each example (0s where there is no variance)."""
        s, e = self.n_seeds, self.n_examples
        parts = (self.seed / s, self.example / e, self.interaction / (s * e))
        total = sum(parts)
        return tuple(p / total for p in parts) if total else (0.0, 0.0, 0.0)

    def half_width(self, n_seeds: float, n_examples: int | None = None, alpha: float = 0.05) -> float:
        """The interval's expected half-width at ``n_seeds`` per arm (inf: the limit, the test set's floor) on
        ``n_examples`` test examples, two-sided at 1 - alpha with t_{n_seeds - 1} tails, as the claims' is."""
        q = sps.norm.isf(alpha / 2) if math.isinf(n_seeds) else sps.t.isf(alpha / 2, n_seeds - 1)
        return float(q * math.sqrt(self.variance(n_seeds, n_examples)))

    def seeds_for(self, half_width: float, n_examples: int | None = None, alpha: float = 0.05,
                  limit: int = 100_000) -> int | None:
        """The fewest seeds per arm whose expected half-width is at most ``half_width``; None where no number
        of seeds gets there on this many examples (the floor is above it) or more than ``limit`` would."""
        if half_width <= 0 or self.half_width(math.inf, n_examples, alpha) >= half_width:
            return None
        lo, hi = 2, 2
        while self.half_width(hi, n_examples, alpha) > half_width:
            if hi >= limit:
                return None
            lo, hi = hi, min(2 * hi, limit)
        while lo < hi:  # the half-width falls with seeds: the first n at or under it
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if self.half_width(mid, n_examples, alpha) > half_width else (lo, mid)
        return lo


def resolution(a: dict, b: dict) -> Resolution:
    """The variance components (``Resolution``) of a - b from each arm's per-example correctness by seed
    (seed -> bool array over the same test examples in one order, as ``stats.accuracy_difference`` takes
    them), over the seeds both arms ran: paired by seed, at least 2."""
    shared = [s for s in a if s in b]
    if len(shared) < 2:
        raise ValueError(f"needs at least 2 seeds run by both arms, found {len(shared)}")
    d = np.stack([np.asarray(a[s], float) - np.asarray(b[s], float) for s in shared])
    n_seeds, n_ex = d.shape
    if n_ex < 2:
        raise ValueError("needs at least 2 test examples")
    ms_seed = n_ex * d.mean(1).var(ddof=1)
    ms_example = n_seeds * d.mean(0).var(ddof=1)
    ms_res = interaction_ms(d)
    return Resolution(seed=max(float(ms_seed - ms_res) / n_ex, 0.0),
                      example=max(float(ms_example - ms_res) / n_seeds, 0.0),
                      interaction=ms_res, n_seeds=n_seeds, n_examples=n_ex)


def failed_run(test_accuracy: float | None, majority_rate: float, loss_curve: Sequence[float] | None = None,
               rule: FailedIf = FailedIf()) -> str | None:
    """Why the run failed, or None when it counts. Failed: no test accuracy; test accuracy at most the
    majority-class rate plus ``rule.accuracy_at_most_majority_plus`` (it learned nothing a constant answer
    does not); a non-finite loss (diverged); with ``rule.loss_rise_over_start`` set, a loss (positive, e.g.
    cross-entropy) that ended more than that fraction above where it began, each end being the mean of its
    tenth of the curve (at least one point) because one ZO step's loss is one noisy batch."""
    if test_accuracy is None or not math.isfinite(test_accuracy):
        return "no test accuracy"
    limit = majority_rate + rule.accuracy_at_most_majority_plus
    if test_accuracy <= limit:
        return (f"test accuracy {100 * test_accuracy:.1f}% is at most the majority rate {100 * majority_rate:.1f}%"
                f" + {100 * rule.accuracy_at_most_majority_plus:.1f} points")
    loss = np.asarray(loss_curve if loss_curve is not None else [], dtype=float)
    if not np.isfinite(loss).all():
        return "the loss became non-finite (diverged)"
    if rule.loss_rise_over_start is not None and len(loss) >= 2:
        k = max(1, len(loss) // 10)
        start, end = float(loss[:k].mean()), float(loss[-k:].mean())
        if end > start * (1 + rule.loss_rise_over_start):
            return (f"the loss rose from {start:.3f} to {end:.3f}, more than {100 * rule.loss_rise_over_start:.0f}%"
                    f" over its start (diverged)")
    return None


def half_width_95(p: float, n: int) -> float:
    """The 95% binomial half-width of an accuracy ``p`` measured on ``n`` examples (normal approximation): the
    report's flag for a dev curve that fell by more than its noise."""
    return 1.96 * math.sqrt(p * (1 - p) / max(n, 1))
