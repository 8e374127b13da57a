"""Claims' statistics on synthetic data whose answer is known, and on hand-computed examples."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from numpy.polynomial.hermite_e import hermegauss
from scipy.optimize import brentq
from scipy.special import expit

from zobench.analysis.design import failed_run, min_detectable_difference, resolution
from zobench.analysis.speed import faster_to_target
from zobench.analysis.stats import (
    FAILS,
    HOLDS,
    MISSING,
    OPEN,
    Evidence,
    Replicates,
    accuracy_difference,
    align,
    decide,
    mcnemar_test,
    p_value,
    paired_bootstrap,
    seed_variance,
    verdict,
)
from zobench.spec.claims import FailedIf, parse_claims

# The realistic design: 5 seeds x 872 SST-2 examples. Correctness ~ Bernoulli(expit(mu_arm + seed + example
# + arm x example)), examples shared by both arms (difficulty sd 2 on the logit scale: many examples are
# right or wrong for every run), seed effects independent per arm. Seed sd 0.2 gives a seed-to-seed sd of
# test accuracy of ~2.75 points (measured over 200 draws), the 2.8.
SEEDS, EXAMPLES, SEED_SD, EXAMPLE_SD, ARM_EXAMPLE_SD = 5, 872, 0.2, 2.0, 0.5
_NODES, _WEIGHTS = hermegauss(80)
_TOTAL_SD = math.sqrt(SEED_SD ** 2 + EXAMPLE_SD ** 2 + ARM_EXAMPLE_SD ** 2)


def _population_accuracy(mu: float) -> float:
    """The arm's accuracy over all seeds and examples: the quantity a claim is about."""
    return float((expit(mu + _TOTAL_SD * _NODES) * _WEIGHTS).sum() / _WEIGHTS.sum())


def _mus(accuracy_b: float, difference: float) -> tuple[float, float]:
    solve = lambda target: brentq(lambda m: _population_accuracy(m) - target, -10, 10)  # noqa: E731
    return solve(accuracy_b + difference), solve(accuracy_b)


def _simulate(rng, mus, seeds=SEEDS, examples=EXAMPLES, seed_sd=SEED_SD):
    difficulty = rng.normal(0, EXAMPLE_SD, examples)
    arms = []
    for mu in mus:
        p = expit(mu + rng.normal(0, seed_sd, (seeds, 1)) + difficulty + rng.normal(0, ARM_EXAMPLE_SD, examples))
        arms.append({s: rng.random(examples) < p[s] for s in range(seeds)})
    return arms


def _coverage(n_sims: int, seed_sd: float = SEED_SD) -> tuple[float, float, float]:
    """(share of 95% intervals covering the true 0, their mean width, the sd of the estimates)."""
    rng, mus = np.random.default_rng(2024), _mus(0.70, 0.0)
    hits, widths, estimates = 0, [], []
    for i in range(n_sims):
        a, b = _simulate(rng, mus, seed_sd=seed_sd)
        reps = accuracy_difference(a, b, resamples=1000, seed=i).replicates
        low, high = reps.interval(0.05)
        hits += low <= 0.0 <= high
        widths.append(high - low)
        estimates.append(reps.estimate)
    return hits / n_sims, float(np.mean(widths)), float(np.std(estimates, ddof=1))


def _claims(*items, **section):
    return parse_claims({**section, "items": list(items)}, "test")


def _claim(cid: str, kind: str = "superiority", **keys) -> dict:
    return {"id": cid, "kind": kind, "a": {"method": "sensitive"}, "b": {"method": "random"}, **keys}


def test_no_difference_is_not_a_win_and_its_interval_covers_zero():
    a, b = _simulate(np.random.default_rng(0), _mus(0.70, 0.0))
    ev = accuracy_difference(a, b)
    low, high = ev.replicates.interval(0.05)
    assert low <= 0.0 <= high
    assert verdict("superiority", low, high, 0.0) != HOLDS
    assert ev.n_seeds == (5, 5) and ev.n_examples == 872 and "paired by seed" in ev.method


def test_five_points_mostly_holds_and_never_fails():
    rng, mus = np.random.default_rng(1), _mus(0.68, 0.05)
    seen = Counter(verdict("superiority", *accuracy_difference(*_simulate(rng, mus), resamples=1000, seed=i)
                           .replicates.interval(0.05), 0.0) for i in range(30))
    # 62% held over 100 draws of this design: 5 points sits below its power-0.8 detectable difference.
    assert seen[HOLDS] >= 15 and seen[FAILS] == 0, seen


def test_coverage_close_to_nominal():
    n = 100
    coverage, width, spread = _coverage(n)
    assert coverage >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / n), coverage
    # ... and not by being wide without bound: the mean width against the estimates' own spread
    assert 0.9 <= width / (2 * 1.96 * spread) <= 1.6, (width, spread)


@pytest.mark.slow
@pytest.mark.parametrize("seed_sd", [0.03, 0.2, 0.3], ids=["examples-dominate", "realistic", "seeds-dominate"])
def test_coverage_close_to_nominal_many_runs(seed_sd):
    n = 1000
    coverage = _coverage(n, seed_sd)[0]
    tolerance = 3 * math.sqrt(0.95 * 0.05 / n)
    assert 0.95 - tolerance <= coverage <= 0.995, coverage  # errs wide by design, not without bound


def test_replicates_are_reproducible_from_their_seed():
    a, b = _simulate(np.random.default_rng(3), _mus(0.7, 0.0), seeds=2, examples=100)
    first, again = (accuracy_difference(a, b, resamples=1000, seed=7).replicates for _ in range(2))
    other = accuracy_difference(a, b, resamples=1000, seed=8).replicates
    assert np.array_equal(first.low, again.low) and not np.array_equal(first.low, other.low)


def test_arms_with_different_seeds_pair_where_they_can():
    a, b = _simulate(np.random.default_rng(4), _mus(0.7, 0.0), seeds=4, examples=200)
    partly = accuracy_difference(a, {2: b[2], 3: b[3], 9: b[0]}, resamples=1000)  # seeds 2 and 3 shared
    assert partly.n_seeds == (4, 3) and "2 seeds paired" in partly.method
    disjoint = accuracy_difference({0: a[0], 1: a[1]}, {5: b[2], 6: b[3]}, resamples=1000)
    assert "Welch" in disjoint.method


@pytest.mark.parametrize("seeds_b", [[0, 1, 2, 3], [2, 3, 7], [5, 6, 7]], ids=["paired", "partly", "disjoint"])
def test_seed_variance_is_unbiased_for_the_variance_of_the_difference(seeds_b):
    """Seeds as draws: a shared seed's two accuracies correlate (rho 0.6), others are independent. Over many
    simulated experiments the seed-level variance estimate averages to the true variance of mean(a) - mean(b)
    (computed in closed form), for every pairing; the disjoint case's df is Welch-Satterthwaite's."""
    rng, seeds_a, rho, sd_a, sd_b = np.random.default_rng(11), [0, 1, 2, 3], 0.6, 0.03, 0.05
    shared = [s for s in seeds_a if s in seeds_b]
    na, nb, k = len(seeds_a), len(seeds_b), len(shared)
    true = sd_a ** 2 / na + sd_b ** 2 / nb - 2 * k * rho * sd_a * sd_b / (na * nb)
    estimates = []
    for _ in range(20000):
        za = rng.standard_normal(na)
        zb = {s: rho * za[seeds_a.index(s)] + math.sqrt(1 - rho ** 2) * rng.standard_normal() if s in shared
              else rng.standard_normal() for s in seeds_b}
        v, df, _ = seed_variance({s: 0.7 + sd_a * za[i] for i, s in enumerate(seeds_a)},
                                 {s: 0.6 + sd_b * zb[s] for s in seeds_b})
        estimates.append(v)
    assert np.mean(estimates) == pytest.approx(true, rel=0.03)
    a, b = {0: 0.70, 1: 0.74, 2: 0.69}, {5: 0.60, 6: 0.66}
    v, df, note = seed_variance(a, b)
    va, vb = np.var(list(a.values()), ddof=1) / 3, np.var(list(b.values()), ddof=1) / 2
    assert v == pytest.approx(va + vb) and "Welch" in note
    assert df == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1))


def test_one_seed_each_is_the_paired_bootstrap_over_examples():
    rng = np.random.default_rng(5)
    ca, cb = rng.random(2000) < 0.75, rng.random(2000) < 0.70
    low, high = paired_bootstrap(ca, cb, resamples=4000).replicates.interval(0.05)
    se = (ca.astype(float) - cb).std(ddof=1) / math.sqrt(2000)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_align_reorders_by_id_and_refuses_other_examples():
    assert align(["a", "b", "c"], ["c", "a", "b"], [True, False, True]).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="not the test set's"):
        align(["a", "b", "c"], ["a", "b", "d"], [True, False, True])


def test_mcnemar_against_hand_computation():
    # 2 examples only a gets right, 8 only b, 90 concordant: Binomial(10, 1/2), P(X <= 2) = 56/1024.
    a = np.array([1] * 2 + [0] * 8 + [1] * 60 + [0] * 30, bool)
    b = np.array([0] * 2 + [1] * 8 + [1] * 60 + [0] * 30, bool)
    m = mcnemar_test(a, b)
    assert (m.a_only, m.b_only) == (2, 8)
    assert m.p_exact == pytest.approx(112 / 1024) and m.p_mid == pytest.approx((112 - 45) / 1024)


def _stepped(n_at_or_below_zero: int, n: int = 1000) -> Replicates:
    """Replicates whose superiority p-value is 2 (m + 1) / n: m of them at -1, the rest at +1."""
    return Replicates.of(0.5, np.r_[np.full(n_at_or_below_zero, -1.0), np.ones(n - n_at_or_below_zero)])


def test_holm_against_hand_computation_and_intervals_agree_with_it():
    claims = _claims(*(_claim(f"c{i}") for i in range(4)))
    reps = [_stepped(m) for m in (4, 19, 14, 1)]  # p = 0.01, 0.04, 0.03, 0.004
    results = decide(claims, {c.id: Evidence(r, (5, 5), 872, "") for c, r in zip(claims, reps)})
    assert [r.p_value for r in results] == pytest.approx([0.01, 0.04, 0.03, 0.004])
    # Holm by hand: sorted 0.004 x 4 = 0.016, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 -> max(0.06, 0.04).
    assert [r.p_adjusted for r in results] == pytest.approx([0.03, 0.06, 0.06, 0.016])
    assert [r.verdict for r in results] == [HOLDS, OPEN, OPEN, HOLDS]  # each alone would have held
    for r in results:
        assert r.alpha_adjusted == pytest.approx(0.05 * r.p_value / r.p_adjusted)
        assert verdict(r.kind, r.adj_low, r.adj_high, r.margin) == r.verdict
        assert r.ci_low > 0  # the unadjusted 95% interval alone says "holds" for all four


def test_an_unmeasured_claim_stays_in_the_family():
    claims = _claims(_claim("measured"), _claim("missing"))
    results = decide(claims, {"measured": Evidence(_stepped(9), (5, 5), 872, "")})  # p = 0.02
    assert [r.p_adjusted for r in results] == pytest.approx([0.04, 1.0])
    assert [r.verdict for r in results] == [HOLDS, MISSING]
    alone = decide(_claims(_claim("measured"), correction="none"), {"measured": Evidence(_stepped(9), (5, 5), 872, "")})
    assert alone[0].p_adjusted == pytest.approx(0.02)


def test_a_claim_on_one_seed_takes_no_holm_step_from_the_others():
    """A one-seed claim's interval is about those two runs: its verdict stays open, and its p (however small)
    must not take Holm's strictest step, which would loosen every other claim's. It enters as p = 1."""
    claims = _claims(_claim("one-seed"), _claim("five-seeds"))
    evidence = {"one-seed": Evidence(_stepped(0), (1, 1), 872, ""),     # p 0.002 on examples alone
                "five-seeds": Evidence(_stepped(16), (5, 5), 872, "")}  # p 0.034
    one, five = decide(claims, evidence)
    assert one.verdict == OPEN and one.p_value == 1.0
    # had the one-seed p entered, five-seeds would be tested at alpha (0.034 <= 0.05): it holds only alone
    assert five.p_adjusted == pytest.approx(0.068) and five.verdict == OPEN


@pytest.mark.parametrize("kind, low, high, margin, expected", [
    ("superiority", 0.01, 0.05, 0.0, HOLDS), ("superiority", -0.05, -0.01, 0.0, FAILS),
    ("superiority", -0.01, 0.02, 0.0, OPEN), ("superiority", 0.01, 0.05, 0.02, OPEN),
    ("superiority", 0.03, 0.05, 0.02, HOLDS), ("superiority", -0.01, 0.015, 0.02, FAILS),
    ("non_inferiority", -0.01, 0.03, 0.02, HOLDS), ("non_inferiority", -0.05, -0.03, 0.02, FAILS),
    ("non_inferiority", -0.03, 0.01, 0.02, OPEN),
    ("equivalence", -0.01, 0.01, 0.02, HOLDS), ("equivalence", 0.02, 0.05, 0.02, FAILS),
    ("equivalence", -0.06, -0.03, 0.02, FAILS), ("equivalence", -0.01, 0.03, 0.02, OPEN),
    ("equivalence", -0.03, 0.03, 0.02, OPEN),
    ("faster_to_target", 0.2, 0.9, math.log(1 / 0.9), HOLDS), ("faster_to_target", -0.5, 0.05, 0.1, FAILS),
    ("faster_to_target", -math.inf, math.inf, 0.0, OPEN),
])
def test_verdict_rule_table(kind, low, high, margin, expected):
    assert verdict(kind, low, high, margin) == expected


@pytest.mark.parametrize("kind, margin", [("superiority", 0.0), ("non_inferiority", 0.02), ("equivalence", 0.03)])
def test_p_value_is_where_the_interval_starts_to_resolve(kind, margin):
    rng = np.random.default_rng(6)
    resolving = 0
    for center in (-0.04, -0.01, 0.0, 0.015, 0.05):
        reps = Replicates.of(center, rng.normal(center, 0.01, 2000))
        p = p_value(reps, kind, margin)
        if p < 1:
            resolving += 1
            assert verdict(kind, *reps.interval(p), margin) != OPEN
            assert verdict(kind, *reps.interval(p * (1 - 1e-3)), margin) == OPEN
    assert resolving >= 3  # centres 4 and 5 sd from the margin's edges resolve at some level below 1


def _curves(rng, seeds, seconds_per_eval, evals=10, top=0.80):
    acc = np.linspace(0.55, top, evals)
    return {s: (seconds_per_eval * np.arange(1, evals + 1) * rng.uniform(0.95, 1.05),
                acc + rng.normal(0, 0.005, evals)) for s in seeds}


def test_faster_to_target_when_a_takes_half_the_time():
    rng = np.random.default_rng(7)
    claims = _claims(_claim("faster", "faster_to_target", target="b_best"))
    # a ends higher: with equal plateaus, a reaches b's best (a maximum of noisy points) only by luck.
    a, b = _curves(rng, range(5), 50.0, top=0.85), _curves(rng, range(5), 100.0)
    ev = faster_to_target(a, b, "b_best", resamples=2000)
    assert ev.replicates.estimate == pytest.approx(math.log(2), abs=0.15)
    assert decide(claims, {"faster": ev})[0].verdict == HOLDS


def test_never_reaching_the_target_fails_only_when_the_run_went_on_long_enough():
    rng = np.random.default_rng(8)
    b = _curves(rng, range(5), 100.0)
    slow_but_long = _curves(rng, range(5), 200.0, top=0.70)  # never reaches b's ~0.80, ran 2,000 s
    stopped_early = _curves(rng, range(5), 10.0, top=0.70)   # never reaches it, stopped at ~100 s
    claims = _claims(_claim("faster", "faster_to_target", target="b_best"))
    long = faster_to_target(slow_but_long, b, "b_best", resamples=2000)
    early = faster_to_target(stopped_early, b, "b_best", resamples=2000)
    assert long.replicates.estimate == -math.inf and decide(claims, {"faster": long})[0].verdict == FAILS
    assert math.isnan(early.replicates.estimate) and decide(claims, {"faster": early})[0].verdict == OPEN
    one_seed = faster_to_target(_curves(rng, [0], 50.0), _curves(rng, [0], 100.0), 0.7)
    assert one_seed.replicates is None and decide(claims, {"faster": one_seed})[0].verdict == OPEN


def test_failed_run_rule():
    rule = FailedIf(accuracy_at_most_majority_plus=0.02, loss_rise_over_start=0.5)
    assert "majority rate 50.9%" in failed_run(0.529, 0.509, rule=rule)
    assert failed_run(0.53, 0.509, [0.7] * 20, rule) is None
    assert "diverged" in failed_run(0.70, 0.509, [0.7] * 10 + [1.2] * 10, rule)
    assert failed_run(0.70, 0.509, [0.7] * 10 + [1.0] * 10, rule) is None  # rose 43%: under the 50% limit
    assert "non-finite" in failed_run(0.70, 0.509, [0.7, float("nan")], FailedIf())
    assert failed_run(None, 0.509) == "no test accuracy"


def test_min_detectable_difference_against_hand_computation():
    # var = 2 x 0.028^2 / 5 (seeds) + 2 x 0.7 x 0.3 / 872 (examples) = 3.136e-4 + 4.8165e-4 = 7.9525e-4,
    # se 0.0282002; t with 4 df (tables): 2.7764 at 0.975, 0.9410 at 0.8.
    m = min_detectable_difference(0.028, 5, 872, 0.70)
    assert m.se == pytest.approx(math.sqrt(7.9525e-4), rel=1e-4) and m.df == 4
    assert m.difference == pytest.approx((2.7764 + 0.9410) * 0.0282002, rel=1e-3)
    huge = min_detectable_difference(0.028, 10**6, 10**8, 0.70)  # normal limit: (1.96 + 0.8416) se
    assert huge.difference == pytest.approx((1.95996 + 0.84162) * huge.se, rel=1e-4)
    assert min_detectable_difference(0.028, 5, 872, 0.70, correlation=0.5).difference < m.difference


def test_resolution_recovers_the_variance_components_of_a_crossed_design():
    # d[s, i] = seed effect + example effect + noise, sds 0.05 / 0.3 / 0.4 over 6 seeds x 300 examples:
    # the ANOVA estimates average to the truth over 400 draws (each within ~3 standard errors of its mean).
    rng = np.random.default_rng(7)
    est = []
    for _ in range(400):
        d = (rng.normal(0, 0.05, (6, 1)) + rng.normal(0, 0.3, (1, 300)) + rng.normal(0, 0.4, (6, 300)))
        r = resolution({s: d[s] for s in range(6)}, {s: np.zeros(300) for s in range(6)})
        est.append((r.seed, r.example, r.interaction))
    seed, example, interaction = np.mean(est, axis=0)
    assert seed == pytest.approx(0.05 ** 2, rel=0.2)
    assert example == pytest.approx(0.3 ** 2, rel=0.05)
    assert interaction == pytest.approx(0.4 ** 2, rel=0.01)
    r = resolution({s: d[s] for s in range(6)}, {s: np.zeros(300) for s in range(6)})
    # the variance of the mean difference at the design it was measured on: seed/S + example/E + interaction/SE
    assert r.variance(6) == pytest.approx(r.seed / 6 + r.example / 300 + r.interaction / 1800)
    assert r.variance(math.inf) == pytest.approx(r.example / 300)


def test_resolution_says_when_the_seed_component_came_out_below_zero():
    # Every seed the same run plus independent per-example noise: no seed effect, and with 3 seeds the
    # estimate falls at or below 0 about half the time; the flag marks exactly those draws.
    rng = np.random.default_rng(11)
    flags = []
    for _ in range(200):
        d = rng.normal(0, 0.3, (1, 400)) + rng.normal(0, 0.4, (3, 400))
        r = resolution({s: d[s] for s in range(3)}, {s: np.zeros(400) for s in range(3)})
        ms_seed = 400 * d.mean(1).var(ddof=1)
        assert r.seed_clamped == (ms_seed <= r.interaction) and (r.seed == 0) == r.seed_clamped
        flags.append(r.seed_clamped)
    assert 0.3 < np.mean(flags) < 0.8
    big = rng.normal(0, 0.2, (3, 1)) + rng.normal(0, 0.4, (3, 400))  # a seed effect far above the noise
    assert not resolution({s: big[s] for s in range(3)}, {s: np.zeros(400) for s in range(3)}).seed_clamped


def test_resolution_half_width_is_the_claims_interval_and_projects_down_to_the_test_sets_floor():
    rng = np.random.default_rng(3)
    a, b = _simulate(rng, _mus(0.75, 0.0), seeds=6, examples=672)
    r = resolution(a, b)
    low, high = accuracy_difference(a, b, resamples=20000, seed=1).replicates.interval(0.05)
    assert r.half_width(6) == pytest.approx((high - low) / 2, rel=0.1)  # the same model, read two ways
    widths = [r.half_width(n) for n in (6, 12, 40, 1000)] + [r.half_width(math.inf)]
    assert widths == sorted(widths, reverse=True) and widths[-1] > 0
    assert r.half_width(6, alpha=0.05 / 3) > r.half_width(6)
    n = r.seeds_for(widths[1])  # 12 seeds' width: 12 is the fewest that reach it
    assert n == 12 and r.half_width(n - 1) > widths[1]
    assert r.seeds_for(widths[-1]) is None and r.seeds_for(widths[-1] * 0.9) is None  # under the floor: never
    with pytest.raises(ValueError, match="at least 2 seeds"):
        resolution({0: a[0]}, {0: b[0], 1: b[1]})
