"""faster_to_target: does arm a reach a dev accuracy in less time than arm b?

Data: per arm and seed, a dev curve of (time, accuracy) points at the same evaluation steps for every seed
(the suite's ``eval_every``); time in seconds or in reference forwards, as the claim's ``clock`` declares,
and positive. An arm's curve is the mean over its seeds, point by point (time and accuracy), over the
evaluations every seed has. Its time to a target is the time of the first mean point at or above the
target: an observed point, no interpolation between evaluations. The target is a declared accuracy, or
``b_best``: the best point of b's mean curve, chosen again in every replicate so that the noise of picking
a maximum is in the interval.

The statistic is the log speed-up s = log(t_b / t_a) (> 0: a is faster); a seed bootstrap (seeds both arms
ran drawn together) gives its replicates. A curve that never reaches the target is handled per replicate:
    a never reaches it, but ran at least as long as b took: a is slower beyond doubt, s = -inf;
    a never reaches it and stopped before b reached it: unknown, s undetermined;
    b never reaches it (a declared target): symmetrically +inf or undetermined; neither reaches it: undetermined.
An undetermined replicate counts against the claim on both sides (-inf for the lower bound, +inf for the
upper), so a claim whose runs stopped too early to tell ends "not resolved", never "holds" or "does not
hold". The seed level has only a few seeds, whose resample is too narrow ((n-1)/n of the variance, normal
tails): each replicate's deviation from the estimate is scaled by sqrt(n / (n-1)) and a t_{n-1} multiplier
(``stats.t_scale``; n the smaller arm's seeds), as the accuracy claims' seed level is, and the interval is
the percentile one. When the estimate itself is infinite or undetermined the replicates are left as they
are (they are then mostly infinite too). With fewer than ``stats.MIN_SEEDS`` seeds in an arm nothing is estimated.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np

from zobench.analysis.stats import CHUNK, MIN_SEEDS, Evidence, Replicates, seed_weights, t_scale

Curve = tuple[np.ndarray, np.ndarray]  # (times, accuracies), in evaluation order


def _stack(curves: Mapping[Hashable, Curve], name: str) -> tuple[np.ndarray, np.ndarray]:
    if not curves:
        raise ValueError(f"arm {name} has no curves")
    pairs = [(np.asarray(t, float), np.asarray(acc, float)) for t, acc in curves.values()]
    if any(t.shape != acc.shape or t.ndim != 1 for t, acc in pairs):
        raise ValueError(f"arm {name}: a curve needs one time per accuracy")
    n = min(len(t) for t, _ in pairs)
    if n == 0:
        raise ValueError(f"arm {name}: a seed has no dev evaluation")
    times, accs = np.stack([t[:n] for t, _ in pairs]), np.stack([acc[:n] for _, acc in pairs])
    if not (times > 0).all() or not np.isfinite(accs).all():
        raise ValueError(f"arm {name}: times must be positive and accuracies finite")
    return times, accs


def _time_to(times: np.ndarray, accs: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per row: the time of the first point at or above the row's target, +inf if none."""
    reached = accs >= target[:, None]
    first = np.take_along_axis(times, reached.argmax(1)[:, None], 1)[:, 0]
    return np.where(reached.any(1), first, np.inf)


def log_speedup(times_a, accs_a, times_b, accs_b, target: float | str) -> np.ndarray:
    """log(t_b / t_a) per row of mean curves (rows: replicates), with the module's never-reached rule."""
    goal = accs_b.max(1) if target == "b_best" else np.full(len(accs_b), float(target))
    t_a, t_b = _time_to(times_a, accs_a, goal), _time_to(times_b, accs_b, goal)
    last_a, last_b = times_a[:, -1], times_b[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.log(t_b) - np.log(t_a)
    s = np.where(np.isinf(t_a) & np.isfinite(t_b), np.where(last_a >= t_b, -np.inf, np.nan), s)
    s = np.where(np.isinf(t_b) & np.isfinite(t_a), np.where(last_b >= t_a, np.inf, np.nan), s)
    return np.where(np.isinf(t_a) & np.isinf(t_b), np.nan, s)


def faster_to_target(a: Mapping[Hashable, Curve], b: Mapping[Hashable, Curve], target: float | str, *,
                     resamples: int = 10000, seed: int = 0) -> Evidence:
    """Evidence for "a reaches ``target`` (an accuracy, or "b_best") in less time than b", as log(t_b / t_a)."""
    (ta, aa), (tb, ab) = _stack(a, "a"), _stack(b, "b")
    n_a, n_b = len(a), len(b)
    estimate = float(log_speedup(ta.mean(0)[None], aa.mean(0)[None], tb.mean(0)[None], ab.mean(0)[None],
                                 target)[0])
    what = f"log(t_b / t_a) to {'b' + chr(39) + 's best mean dev accuracy' if target == 'b_best' else target}"
    n = min(n_a, n_b)
    if n < MIN_SEEDS:  # the verdicts' rule (stats.MIN_SEEDS): one seed a side has no seed-to-seed variance
        return Evidence(None, (n_a, n_b), None, f"{what}: {estimate:+.3f}; needs at least {MIN_SEEDS} seeds per arm")
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, resamples, CHUNK):
        wa, wb = seed_weights(rng, min(CHUNK, resamples - start), list(a), list(b))
        reps.append(log_speedup(wa @ ta, wa @ aa, wb @ tb, wb @ ab, target))
    values = np.concatenate(reps)
    undetermined = float(np.isnan(values).mean())
    if math.isfinite(estimate):
        with np.errstate(invalid="ignore"):  # an infinite replicate stays infinite, an undetermined one NaN
            values = estimate + (values - estimate) * math.sqrt(n / (n - 1)) * t_scale(rng, n - 1.0, len(values))
    method = (f"{what} on mean dev curves; seed bootstrap, {resamples} replicates (seed {seed}), seeds both "
              f"ran paired; deviations scaled to t tails ({n - 1} df); percentile interval; "
              f"{100 * undetermined:.1f}% of replicates undetermined (a run stopped before the other reached "
              f"the target)")
    return Evidence(Replicates.of(estimate, values), (n_a, n_b), None, method)
