"""Verdicts on declared claims: intervals from a two-level bootstrap, p-values from the same intervals, Holm.

Every claim is about a difference a - b (for speed, the log of b's time over a's). Its evidence is a set of
bootstrap replicates of that difference; an interval at level 1 - alpha is read off them, and the verdict is
the interval against the claim's margin (``verdict``), once each arm has at least ``MIN_SEEDS`` usable
seeds (a claim is about methods, and one seed gives no seed-to-seed variance). The p-value is the smallest
alpha at which that interval resolves the claim (holds or does not hold): the test and the interval are one
object, so a decision by p-value and a decision by interval cannot disagree.

Alpha is two-sided: a resolved verdict is wrong (holds when false, does not hold when true) with probability
at most alpha, each side at most alpha / 2. Over the suite's claims, Holm's step-down procedure
(statsmodels' multipletests) adjusts the p-values; claim i then holds or fails only when its adjusted p is
at most alpha, and the interval it reports beside the unadjusted one is at level 1 - alpha_i with
alpha_i = alpha * p_i / p_adjusted_i: exactly the widest interval that still resolves when Holm rejects
(its bounds cross the margin if and only if p_adjusted_i <= alpha), so the reported interval and the
verdict agree by construction. A claim without evidence stays in the family with p = 1 (the family is the
declared one, not the measured one), and so does a claim with an arm under ``MIN_SEEDS`` seeds: its interval
is about those runs, and its p must not take a Holm step from the claims that can be decided.

Accuracy model (``accuracy_difference``): per-example correctness of each arm for each seed, on one test
set shared by every arm and seed. Seeds and examples are crossed, not nested (every seed sees the same
examples), so each replicate draws one resample of the examples, shared by every seed of both arms (the
example pairing), and a resampling of examples per seed would divide the test set's variance by the number
of seeds. At the seed level a nonparametric resample of 2-10 seeds is too narrow: its variance is (n-1)/n
of the sample's and its tails normal, where the mean of n seeds has t_{n-1} tails. So by default
(``seed_level="t"``) the seed level is drawn from its sampling distribution instead: a replicate is the
estimate plus (the example-resampled deviation + sqrt(V_seed) * Z) * sqrt(df / chi2_df), with V_seed and df
from the per-seed accuracies (paired by seed when both arms ran the same seeds) less the seed x example
interaction that both levels would otherwise count (``interaction_overlap``). The whole deviation carries
the seed level's t tails, not only its seed part: a Satterthwaite-style mix (t on the seed part alone)
trusts a seed variance that came out small by chance, and covered 92-93% of 95% in simulations of this
design (5 seeds x 872 examples, seed sd 2.8 points, logit model; ``tests/test_stats.py``), as did the fully
nonparametric two-level bootstrap (93.2%; ``seed_level="resample"``, kept to show it). This choice covered
96.0% of 95% (99.6% of 98.75%, Holm's first step over 4 claims) there, 95.4% when the seeds dominate, and
99.3% when the seeds barely differ and the examples dominate (1,000 runs each): it errs wide, by up to ~40%
of the width in that last case, rather than letting a claim hold wrongly.
BCa is not used: its acceleration comes from a jackknife, which has no single meaning over two crossed
levels and is unstable over 5 seeds, and the difference of two means of ~800 binary outcomes is close to
symmetric, so the skew it corrects is small next to the few-seeds error it does not correct.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from zobench.spec.claims import Claim

HOLDS, FAILS, OPEN, MISSING = "holds", "does not hold", "not resolved", "not measured"
# A claim is about methods: its verdict needs each arm's seed-to-seed variance, so at least this many usable
# seeds per arm. With fewer the interval is still reported, and describes those runs, not the methods.
MIN_SEEDS = 2
CHUNK = 1000  # replicates per block: bounds the (block x examples) count matrix to a few MB


@dataclass(frozen=True)
class Replicates:
    """Bootstrap replicates of a statistic. ``low`` and ``high`` are the same replicates sorted, an
    undetermined one (NaN) counted as -inf in ``low`` and +inf in ``high``: against the claim either way."""

    estimate: float
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def of(cls, estimate: float, values: np.ndarray):
        values = np.asarray(values, dtype=float)
        return cls(float(estimate), np.sort(np.where(np.isnan(values), -np.inf, values)),
                   np.sort(np.where(np.isnan(values), np.inf, values)))

    def interval(self, alpha: float) -> tuple[float, float]:
        """The percentile interval at 1 - alpha, cutting off k replicates a side with k + 1 <= B alpha / 2:
        never narrower than alpha asks, and changing exactly at the alphas ``p_value`` returns (1e-6 absorbs
        rounding). A level beyond what B replicates can show (B alpha / 2 < 1) is unbounded, not the extremes."""
        n = len(self.low)
        k = math.floor(alpha / 2 * n + 1e-6) - 1
        if k < 0:
            return -math.inf, math.inf
        k = min(k, n - 1)
        return float(self.low[k]), float(self.high[n - 1 - k])


def t_scale(rng: np.random.Generator, df: float, size: int) -> np.ndarray | float:
    """Multipliers sqrt(df / chi2_df): a normal deviation times one is t_df. They give replicates the tails of
    a mean over few seeds, which a resample of those seeds cannot produce (1.0 when df is infinite)."""
    return np.sqrt(df / rng.chisquare(df, size)) if math.isfinite(df) else 1.0


@dataclass(frozen=True)
class Evidence:
    """One claim's statistic before the family is decided; ``replicates`` None: not measurable."""

    replicates: Replicates | None
    n_seeds: tuple[int, int]
    n_examples: int | None
    method: str


@dataclass(frozen=True)
class Result:
    claim: str
    kind: str
    margin: float            # on the estimate's scale (speed: log of the time ratio)
    estimate: float
    ci_low: float            # the unadjusted 1 - alpha interval
    ci_high: float
    alpha: float
    alpha_adjusted: float    # the level of the interval the verdict reads (Holm)
    adj_low: float
    adj_high: float
    p_value: float
    p_adjusted: float
    verdict: str
    n_seeds: tuple[int, int]
    n_examples: int | None
    method: str


def verdict(kind: str, low, high, margin: float):
    """The interval rule (works on arrays). Superiority (a - b > margin, default 0): holds if low > margin,
    does not hold if high < margin. Non-inferiority (a - b > -margin): holds if low > -margin, does not hold
    if high < -margin. Equivalence (|a - b| < margin): holds if the interval lies inside (-margin, margin),
    does not hold if it lies entirely outside (low >= margin or high <= -margin). Faster to target is
    superiority on log(t_b / t_a) with the margin already on that scale. Otherwise not resolved."""
    low, high = np.asarray(low), np.asarray(high)
    if kind in ("superiority", "faster_to_target"):
        holds, fails = low > margin, high < margin
    elif kind == "non_inferiority":
        holds, fails = low > -margin, high < -margin
    elif kind == "equivalence":
        holds, fails = (low > -margin) & (high < margin), (low >= margin) | (high <= -margin)
    else:
        raise ValueError(f"unknown kind of claim: {kind}")
    out = np.where(holds, HOLDS, np.where(fails, FAILS, OPEN))
    return str(out) if out.ndim == 0 else out


def p_value(reps: Replicates, kind: str, margin: float) -> float:
    """The smallest alpha at which the 1 - alpha interval resolves the claim (1 when none does): the
    interval at alpha resolves exactly when alpha >= p. Intervals only change when a bound moves by one
    replicate, so every such step is checked at once; B replicates cannot show a p below about 2 / B."""
    n = len(reps.low)
    k = np.arange((n + 1) // 2)  # replicates cut off each side
    resolved = verdict(kind, reps.low[k], reps.high[n - 1 - k], margin) != OPEN
    if not resolved.any():
        return 1.0
    return float(min(1.0, 2 * (int(np.argmax(resolved)) + 1) / n))


def _margin(claim: Claim) -> float:
    """The margin on the scale of the claim's estimate: the speed claim's is a fraction of b's time saved."""
    return -math.log1p(-claim.margin) if claim.kind == "faster_to_target" else claim.margin


def decide(claims: Sequence[Claim], evidence: Mapping[str, Evidence]) -> list[Result]:
    """Each declared claim's verdict, Holm-adjusted over the whole family (see the module's docstring)."""
    if not claims:
        return []
    alpha, correction = claims[0].alpha, claims[0].correction
    # A claim that cannot be decided (no replicates, or an arm under MIN_SEEDS seeds, whose interval is about
    # those runs and not the methods) is no evidence: p 1, so that it takes no step of Holm's from the others.
    ps = [p_value(e.replicates, c.kind, _margin(c))
          if (e := evidence.get(c.id)) and e.replicates and min(e.n_seeds) >= MIN_SEEDS else 1.0 for c in claims]
    adjusted = multipletests(ps, alpha=alpha, method="holm")[1] if correction == "holm" else np.array(ps)
    results = []
    for c, p, p_adj in zip(claims, ps, adjusted):
        e = evidence.get(c.id)
        margin = _margin(c)
        if e is None or e.replicates is None:
            nan = float("nan")
            results.append(Result(c.id, c.kind, margin, nan, nan, nan, alpha, alpha * p / p_adj, nan, nan, p,
                                  float(p_adj), MISSING if e is None else OPEN, e.n_seeds if e else (0, 0),
                                  e.n_examples if e else None, e.method if e else "no records"))
            continue
        a_adj = alpha * p / p_adj
        lo, hi = e.replicates.interval(alpha)
        adj_lo, adj_hi = e.replicates.interval(a_adj)
        v = verdict(c.kind, adj_lo, adj_hi, margin) if p_adj <= alpha else OPEN
        method = e.method
        if min(e.n_seeds) < MIN_SEEDS:
            v = OPEN
            method += (f"; not decided: a verdict needs at least {MIN_SEEDS} seeds per arm (with one, the interval "
                       f"is about those runs, not the methods)")
        results.append(Result(c.id, c.kind, margin, e.replicates.estimate, lo, hi, alpha, a_adj, adj_lo, adj_hi,
                              p, float(p_adj), v, e.n_seeds, e.n_examples, method))
    return results


def counts(rng: np.random.Generator, size: int, n_items: int, n_draws: int) -> np.ndarray:
    """(size, n_items) counts of ``n_draws`` uniform draws with replacement: one bootstrap resample a row."""
    idx = rng.integers(0, n_items, (size, n_draws)) + (np.arange(size) * n_items)[:, None]
    return np.bincount(idx.ravel(), minlength=size * n_items).reshape(size, n_items)


def seed_weights(rng: np.random.Generator, size: int, seeds_a: Sequence, seeds_b: Sequence):
    """Seed resamples for both arms, (size, n_a) and (size, n_b) weights summing to 1 a row: the seeds both
    arms ran are drawn together (paired), each arm's other seeds on their own, so an arm keeps its count."""
    shared = [s for s in seeds_a if s in set(seeds_b)]
    c_shared = counts(rng, size, len(shared), len(shared)) if shared else np.zeros((size, 0), int)
    out = []
    for seeds in (seeds_a, seeds_b):
        own = [s for s in seeds if s not in set(shared)]
        c_own = counts(rng, size, len(own), len(own)) if own else np.zeros((size, 0), int)
        cols = {s: c_shared[:, i] for i, s in enumerate(shared)} | {s: c_own[:, i] for i, s in enumerate(own)}
        out.append(np.stack([cols[s] for s in seeds], axis=1) / len(seeds))
    return out[0], out[1]


def seed_variance(acc_a: Mapping[Hashable, float], acc_b: Mapping[Hashable, float]) -> tuple[float, float, str]:
    """(variance of mean(a) - mean(b) from seed to seed, its degrees of freedom, a note). Same seeds: the
    paired variance, n - 1 df. Two or more shared: the general formula with their covariance and min(n) - 1
    df (the least Welch's can be). Otherwise Welch. An arm with one seed adds no variance: said in the note."""
    a, b = np.array(list(acc_a.values()), float), np.array(list(acc_b.values()), float)
    shared = [s for s in acc_a if s in acc_b]
    if set(acc_a) == set(acc_b) and len(a) >= 2:
        d = np.array([acc_a[s] - acc_b[s] for s in shared])
        return float(d.var(ddof=1) / len(d)), len(d) - 1.0, f"paired by seed ({len(d)} seeds)"
    va = a.var(ddof=1) / len(a) if len(a) >= 2 else 0.0
    vb = b.var(ddof=1) / len(b) if len(b) >= 2 else 0.0
    single = " and ".join(f"arm {n} has one seed: its seed-to-seed variance is not in the interval"
                          for n, x in (("a", a), ("b", b)) if len(x) < 2)
    if len(shared) >= 2 and len(a) >= 2 and len(b) >= 2:
        cov = np.cov([acc_a[s] for s in shared], [acc_b[s] for s in shared])[0, 1]
        v = max(va + vb - 2 * cov * len(shared) / (len(a) * len(b)), 0.0)
        return float(v), min(len(a), len(b)) - 1.0, f"{len(shared)} seeds paired, the others not"
    if va + vb == 0:
        return 0.0, math.inf, single or "no seed-to-seed variance"
    df = (va + vb) ** 2 / sum(v ** 2 / (len(x) - 1) for v, x in ((va, a), (vb, b)) if len(x) >= 2)
    return float(va + vb), float(df), "seeds not paired (Welch)" + (f"; {single}" if single else "")


def interaction_ms(m: np.ndarray) -> float:
    """The seed x example interaction mean square of a (seeds, examples) table (two-way ANOVA residual)."""
    r = m - m.mean(1, keepdims=True) - m.mean(0, keepdims=True) + m.mean()
    return float((r ** 2).sum() / ((m.shape[0] - 1) * (m.shape[1] - 1)))


def interaction_overlap(A: np.ndarray, B: np.ndarray, seeds_a: Sequence, seeds_b: Sequence) -> float:
    """The part of the variance that both levels count. Each seed's accuracy carries its own per-example
    noise (the seed x example interaction), and so does each example's seed mean: the seed level and the
    example level each hold interaction / (seeds x examples), the true variance of the mean holds it once
    (the two-way crossed model: var = seed/S + example/E + interaction/(S E)). Removing one copy makes the
    sum the unbiased ANOVA estimate. Same seeds: the interaction of the paired differences; disjoint seeds:
    each arm's own; partly shared: nothing removed (their covariance is unknown), which errs wide."""
    n_ex = A.shape[1]
    if list(seeds_a) == list(seeds_b) and len(A) >= 2:
        return interaction_ms(A - B) / (len(A) * n_ex)
    if set(seeds_a) & set(seeds_b):
        return 0.0
    return sum(interaction_ms(M) / (len(M) * n_ex) for M in (A, B) if len(M) >= 2)


def _stack(arm: Mapping[Hashable, np.ndarray], name: str) -> np.ndarray:
    if not arm:
        raise ValueError(f"arm {name} has no runs")
    rows = [np.asarray(v, dtype=bool) for v in arm.values()]
    if len({r.shape for r in rows}) != 1 or rows[0].ndim != 1 or not rows[0].size:
        raise ValueError(f"arm {name}: every run needs one correctness value per test example, in one id order")
    return np.stack(rows).astype(float)


def accuracy_difference(a: Mapping[Hashable, np.ndarray], b: Mapping[Hashable, np.ndarray], *,
                        resamples: int = 10000, seed: int = 0, seed_level: str = "t") -> Evidence:
    """Mean test accuracy of a minus b, from ``arm[seed] -> bool array over the test examples``; every array
    in the order of one id array (``align`` builds them). Arms may have different seeds. See the module's
    docstring for the model; ``seed`` makes the replicates reproducible."""
    A, B = _stack(a, "a"), _stack(b, "b")
    if A.shape[1] != B.shape[1]:
        raise ValueError("the arms were scored on different numbers of test examples")
    n_ex = A.shape[1]
    estimate = A.mean() - B.mean()
    if list(a) != list(b) and set(a) == set(b):
        B = np.stack([B[list(b).index(s)] for s in a])  # one seed order, so rows pair
        b = {s: b[s] for s in a}
    v_seed, df, note = seed_variance(dict(zip(a, A.mean(1))), dict(zip(b, B.mean(1))))
    if seed_level == "t":
        v_seed = max(v_seed - interaction_overlap(A, B, list(a), list(b)), 0.0)
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, resamples, CHUNK):
        size = min(CHUNK, resamples - start)
        w = counts(rng, size, n_ex, n_ex) / n_ex
        acc_a, acc_b = w @ A.T, w @ B.T  # (size, seeds): each seed's accuracy on the resampled examples
        if seed_level == "t":
            deviation = acc_a.mean(1) - acc_b.mean(1) - estimate + math.sqrt(v_seed) * rng.standard_normal(size)
            reps.append(estimate + deviation * t_scale(rng, df, size))
        elif seed_level == "resample":
            wa, wb = seed_weights(rng, size, list(a), list(b))
            reps.append((wa * acc_a).sum(1) - (wb * acc_b).sum(1))
        else:
            raise ValueError(f"seed_level: 't' or 'resample', not {seed_level!r}")
    how = ("examples resampled (shared by every seed and arm), seed level and tails t" if seed_level == "t"
           else "examples resampled (shared by every seed and arm), seeds resampled")
    method = (f"two-level bootstrap of the accuracy difference, {resamples} replicates (seed {seed}): {how}"
              f"{f' ({df:.0f} df)' if seed_level == 't' and v_seed > 0 else ''}; {note}; percentile interval")
    return Evidence(Replicates.of(estimate, np.concatenate(reps)), (len(a), len(b)), n_ex, method)


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, *, resamples: int = 10000,
                     seed: int = 0) -> Evidence:
    """One run of each arm on the same examples: the example level alone (about these runs, not methods)."""
    return accuracy_difference({0: correct_a}, {0: correct_b}, resamples=resamples, seed=seed)


def align(ids: Sequence, run_ids: Sequence, run_correct: Sequence[bool], where: str = "run") -> np.ndarray:
    """A run's correctness reordered to ``ids``; a run scored on other examples is refused, not padded."""
    run_ids, run_correct = list(run_ids), np.asarray(run_correct, dtype=bool)
    pos = {x: i for i, x in enumerate(run_ids)}
    if len(pos) != len(run_ids) or len(run_ids) != len(run_correct) or set(pos) != set(ids) \
            or len(ids) != len(pos):
        raise ValueError(f"{where}: its example ids are not the test set's ({len(run_ids)} ids, {len(ids)} expected)")
    return run_correct[[pos[x] for x in ids]]


@dataclass(frozen=True)
class McNemar:
    a_only: int    # examples a got right and b wrong
    b_only: int
    p_exact: float
    p_mid: float


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's test of one run of each arm on the same examples: only the discordant examples count.
    Exact: two-sided binomial test of a_only out of a_only + b_only at 1/2 (statsmodels). Mid-p: the same
    with half the probability of the observed count, less conservative than the exact test and close to
    nominal (Fagerland, Lydersen and Laake 2013)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    table = [[int((a & b).sum()), n10], [n01, int((~a & ~b).sum())]]
    exact = float(mcnemar(table, exact=True).pvalue)
    k, n = min(n10, n01), n10 + n01
    mid = min(1.0, 2 * sps.binom.cdf(k, n, 0.5) - sps.binom.pmf(k, n, 0.5)) if n else 1.0
    return McNemar(n10, n01, exact, float(mid))
