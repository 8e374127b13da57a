"""Claims: what a suite sets out to show, declared in its YAML before the run and validated up front.

    claims:
      alpha: 0.05                 # family-wise: a wrong resolved verdict anywhere in the suite at most this
      correction: holm            # Holm over the claims below (or none)
      resamples: 10000            # bootstrap replicates, drawn from `seed`
      seed: 0
      failed_if: {accuracy_at_most_majority_plus: 0.02, loss_rise_over_start: 0.5}
      items:
        - id: sensitive-beats-random
          name: sensitive 0.1% beats random 0.1% at equal steps
          kind: superiority       # superiority | non_inferiority | equivalence | faster_to_target
          a: {method: sensitive, quant: none}
          b: {method: random, quant: none}
          metric: test_best       # test_best (test at the best dev step) | test_after (at the last step)
          margin: 0.0             # a fraction of accuracy: 0.01 is 1 point
        - id: sensitive-faster
          kind: faster_to_target
          a: {method: sensitive, quant: none}
          b: {method: full, quant: none}
          target: b_best          # b's best mean dev accuracy, or a fixed accuracy such as 0.70
          clock: step_forwards    # step_forwards | train_s | reference_forwards (see below)
          margin: 0.0             # the fraction of b's time a must save

Each claim is about the difference a - b. A parsed claim carries every setting its verdict depends on (the
family's alpha, correction, bootstrap and failed-run rule too), so its hash changes whenever its verdict
could; the section's hash also covers which claims share the Holm family. Records carry both, so a claim
edited after its data exists shows as a different hash. Pure data: no numpy, no torch.

A speed claim's clock says what a dev point's time is: ``step_forwards``, the steps so far times the run's
median step over two of its own forwards (each step timed beside a plain forward of its batch, counted twice, in
the same process: load that slows a run slows both, so the ratio holds, and it is comparable between arms on one
model); ``train_s``, training seconds (what a user waits, and whatever else the machine did then);
``reference_forwards``, training seconds over the run's median two-forward time (kept for records that
declared it: load that varies during a run inflates the seconds and not the median, so it is not
load-free).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from zobench.errors import UserError
from zobench.spec.selectors import parse_selector, unknown_key

SECTION_KEYS = ("alpha", "correction", "resamples", "seed", "failed_if", "items")
CLAIM_KEYS = ("id", "name", "kind", "a", "b", "metric", "margin", "target", "clock")
KINDS = ("superiority", "non_inferiority", "equivalence", "faster_to_target")
ACCURACY_METRICS = ("test_best", "test_after")
CLOCKS = ("step_forwards", "train_s", "reference_forwards")
CORRECTIONS = ("holm", "none")
FAILED_IF_KEYS = ("accuracy_at_most_majority_plus", "loss_rise_over_start", "count_in_arm")
# Fewer replicates than this cannot resolve the tails a Holm-adjusted interval reaches (alpha/k over two tails).
MIN_RESAMPLES = 1000
MAX_RESAMPLES = 1_000_000  # a report decides every declaration it meets: its cost is bounded (a record is data)
ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class FailedIf:
    """A run that did not learn is a failed run: by default excluded from its arm and listed, never a property
    of its method (a run broken by a bug or a bad set-up says nothing about the method).

    Failed when its test accuracy is at most the majority-class rate plus ``accuracy_at_most_majority_plus``,
    when its loss became non-finite, or (when set) when its loss ended more than ``loss_rise_over_start`` (a
    fraction) above where it began (``zobench.analysis.design.failed_run``). With ``count_in_arm`` a failed
    run stays in its arm at what it measured, and is listed as failed: for a suite whose question is which
    method to use at declared settings, a method that often fails to learn there is part of the answer, and
    leaving its failures out would judge it on its survivors.
    """

    accuracy_at_most_majority_plus: float = 0.0
    loss_rise_over_start: float | None = None
    count_in_arm: bool = False


@dataclass(frozen=True)
class Claim:
    id: str
    name: str
    kind: str
    a: dict[str, list]
    b: dict[str, list]
    metric: str
    margin: float
    alpha: float
    correction: str
    resamples: int
    seed: int
    failed_if: FailedIf
    target: float | str | None = None  # faster_to_target: a dev accuracy, or "b_best"
    clock: str | None = None           # faster_to_target: which time the curves are read in

    @property
    def hash(self) -> str:
        return claim_hash(self)


def _canonical(value: Any) -> Any:
    """Selector value lists in a fixed order: {method: [a, b]} and {method: [b, a]} select the same cells."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_canonical(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    return value


def claim_hash(claim: Claim) -> str:
    """sha256 of the claim's canonical JSON: key order, list order in selectors and number spelling in the
    YAML (0.01 or 1.0e-2) do not change it; any value that can change the verdict does."""
    data = asdict(claim)
    if not data["failed_if"]["count_in_arm"]:  # added later: hashed only when set, so that a claim declared
        del data["failed_if"]["count_in_arm"]  # before it existed keeps its hash
    text = json.dumps(_canonical(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def claims_hash(claims: list[Claim]) -> str:
    """The section's hash: every claim's, in id order (Holm's family does not depend on declaration order)."""
    text = json.dumps(sorted(c.hash for c in claims), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping")
    return value


def _known(item: dict, where: str, keys) -> None:
    for k in item:
        if k not in keys:
            raise unknown_key(where, str(k), keys)


def finite_number(value: Any) -> bool:
    """An int or float, not a bool, finite: what a declared setting, or a score a verdict or a pilot reads from
    a results file, must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fraction(value: Any, where: str, low: float, high: float, what: str) -> float:
    if not finite_number(value) or not low <= value < high:
        raise UserError(f"{where}: expected {what}")
    return float(value)


def _count(value: Any, where: str, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        raise UserError(f"{where}: expected a whole number >= {low}" + (f" and <= {high:,}" if high else ""))
    return value


def _failed_if(value: Any, where: str) -> FailedIf:
    if value is None:
        return FailedIf()
    item = _mapping(value, where)
    _known(item, where, FAILED_IF_KEYS)
    plus = _fraction(item.get("accuracy_at_most_majority_plus", 0.0), f"{where}.accuracy_at_most_majority_plus",
                     0.0, 1.0, "a fraction of accuracy in [0, 1) (0.02 is 2 points)")
    rise = item.get("loss_rise_over_start")
    if rise is not None:
        rise = _fraction(rise, f"{where}.loss_rise_over_start", 0.0, math.inf,
                         "a fraction >= 0 (0.5: the loss ended 50% above where it started)")
    count = item.get("count_in_arm", False)
    if not isinstance(count, bool):
        raise UserError(f"{where}.count_in_arm: expected true or false")
    return FailedIf(plus, rise, count)


def _margin(item: dict, kind: str, where: str) -> float:
    w = f"{where}.margin"
    if kind in ("non_inferiority", "equivalence"):
        if "margin" not in item:
            raise UserError(f"{w}: required for {kind} (a fraction of accuracy: 0.01 is 1 point)")
        margin = _fraction(item["margin"], w, 0.0, 0.5, "a fraction of accuracy in (0, 0.5): 0.01 is 1 point")
        if margin == 0:
            raise UserError(f"{w}: must be > 0 for {kind} (with 0, no interval can ever show it)")
        return margin
    if kind == "faster_to_target":
        return _fraction(item.get("margin", 0.0), w, 0.0, 1.0, "the fraction of b's time a must save, in [0, 1)")
    return _fraction(item.get("margin", 0.0), w, 0.0, 0.5, "a fraction of accuracy in [0, 0.5): 0.01 is 1 point")


def _speed_fields(item: dict, kind: str, where: str) -> tuple[float | str | None, str | None, str]:
    """(target, clock, metric): the speed claim reads dev curves; the others read one test accuracy."""
    if kind != "faster_to_target":
        for k in ("target", "clock"):
            if k in item:
                raise UserError(f"{where}.{k}: only for kind faster_to_target")
        metric = item.get("metric", "test_best")
        if metric not in ACCURACY_METRICS:
            raise UserError(f"{where}.metric: '{metric}' is not one of {', '.join(ACCURACY_METRICS)}")
        return None, None, metric
    if item.get("metric", "dev_accuracy") != "dev_accuracy":
        raise UserError(f"{where}.metric: faster_to_target reads the dev curves (metric: dev_accuracy)")
    if "target" not in item:
        raise UserError(f"{where}.target: required for faster_to_target (b_best, or an accuracy such as 0.70)")
    target = item["target"]
    if target != "b_best":
        target = _fraction(target, f"{where}.target", 0.0, 1.0 + 1e-12, "b_best or an accuracy in (0, 1]")
        if target == 0:
            raise UserError(f"{where}.target: expected b_best or an accuracy in (0, 1]")
    clock = item.get("clock", "train_s")
    if clock not in CLOCKS:
        raise UserError(f"{where}.clock: '{clock}' is not one of {', '.join(CLOCKS)}")
    return target, clock, "dev_accuracy"


def _claim(item: Any, where: str, family: dict) -> Claim:
    item = _mapping(item, where)
    _known(item, where, CLAIM_KEYS)
    cid = item.get("id")
    if not isinstance(cid, str) or not ID.match(cid):
        raise UserError(f"{where}.id: expected a short id of lowercase letters, digits, '-' and '_'")
    kind = item.get("kind")
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(KINDS)}"
        raise UserError(f"{where}.kind: '{kind}' is not a kind of claim{hint}")
    arms = {}
    for side in ("a", "b"):
        if not item.get(side):
            raise UserError(f"{where}.{side}: required: a selector of arm {side}'s cells, e.g. {{method: sensitive}}")
        arms[side] = parse_selector(item[side], f"{where}.{side}")
    if _canonical(arms["a"]) == _canonical(arms["b"]):
        raise UserError(f"{where}: a and b select the same cells")
    target, clock, metric = _speed_fields(item, kind, where)
    name = item.get("name", cid)
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}.name: expected a non-empty text")
    return Claim(cid, name, kind, arms["a"], arms["b"], metric, _margin(item, kind, where), target=target,
                 clock=clock, **family)


def parse_claims(data: Any, where: str) -> list[Claim]:
    """The ``claims:`` section of a suite (``where`` names the file), or one line saying what is wrong."""
    w = f"{where}: claims"
    section = _mapping(data, w)
    _known(section, w, SECTION_KEYS)
    alpha = _fraction(section.get("alpha", 0.05), f"{w}.alpha", 1e-6, 0.5,
                      "a family-wise error rate in (0, 0.5), e.g. 0.05")
    correction = section.get("correction", "holm")
    if correction not in CORRECTIONS:
        raise UserError(f"{w}.correction: '{correction}' is not one of {', '.join(CORRECTIONS)}")
    family = dict(alpha=alpha, correction=correction,
                  resamples=_count(section.get("resamples", 10000), f"{w}.resamples", MIN_RESAMPLES, MAX_RESAMPLES),
                  seed=_count(section.get("seed", 0), f"{w}.seed", 0),
                  failed_if=_failed_if(section.get("failed_if"), f"{w}.failed_if"))
    items = section.get("items")
    if not isinstance(items, list) or not items:
        raise UserError(f"{w}.items: expected a non-empty list of claims")
    claims = [_claim(item, f"{w}.items[{i}]", family) for i, item in enumerate(items)]
    seen: dict[str, int] = {}
    for i, c in enumerate(claims):
        if c.id in seen:
            raise UserError(f"{w}.items[{i}].id: '{c.id}' already used by items[{seen[c.id]}]")
        seen[c.id] = i
    # A bootstrap p is at least 2 / resamples; Holm's first step tests at alpha / (number of claims).
    m = len(claims) if correction == "holm" else 1
    strictest, needed = alpha / m, math.ceil(2 * m / alpha - 1e-9)
    if family["resamples"] < needed:
        raise UserError(f"{w}.resamples: {family['resamples']} replicates cannot show a p below "
                        f"{2 / family['resamples']:.2g}, and the strictest level a claim is tested at here is "
                        f"{strictest:.2g}: expected at least {needed}")
    return claims
