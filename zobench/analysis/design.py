"""Before and around the statistics: what a design can resolve, and which runs count at all.

``min_detectable_difference`` sizes a design (seeds per arm, test examples) before the run, so that margins
are declared from it rather than from the results. ``failed_run`` applies a suite's declared ``failed_if``
rule: a run that did not learn is excluded from its arm and reported as failed, never averaged in as if its
method had done that badly (nor left out silently: the caller lists it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

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
