"""The claims section of a suite: its validation (one line naming the file and key) and its hashes."""

from __future__ import annotations

import copy

import pytest
import yaml

from zobench.errors import UserError
from zobench.spec.claims import FailedIf, claims_hash, parse_claims

SECTION = yaml.safe_load("""
alpha: 0.05
failed_if: {accuracy_at_most_majority_plus: 0.02, loss_rise_over_start: 0.5}
items:
  - id: sensitive-beats-random
    kind: superiority
    a: {method: sensitive, quant: none}
    b: {method: random, quant: none}
  - id: sensitive-vs-full
    kind: non_inferiority
    a: {method: sensitive, quant: none}
    b: {method: full, quant: none}
    margin: 0.06
  - id: sensitive-faster
    kind: faster_to_target
    a: {method: sensitive, quant: none}
    b: {method: full, quant: none}
    target: b_best
""")


def _with(**changes) -> dict:
    """SECTION with the first claim's keys changed (None removes a key)."""
    data = copy.deepcopy(SECTION)
    for k, v in changes.items():
        if v is None:
            data["items"][0].pop(k, None)
        else:
            data["items"][0][k] = v
    return data


def test_parses_kinds_defaults_and_family_settings():
    sup, ni, fast = parse_claims(SECTION, "suites/x.yaml")
    assert (sup.kind, sup.margin, sup.metric, sup.name) == ("superiority", 0.0, "test_best", "sensitive-beats-random")
    assert sup.a == {"method": ["sensitive"], "quant": ["none"]}
    assert (ni.margin, fast.target, fast.clock, fast.metric) == (0.06, "b_best", "train_s", "dev_accuracy")
    assert all(c.alpha == 0.05 and c.correction == "holm" and c.resamples == 10000 for c in (sup, ni, fast))
    assert sup.failed_if == FailedIf(0.02, 0.5)


@pytest.mark.parametrize("data, message", [
    (_with(kind="superority"), "suites/x.yaml: claims.items[0].kind: 'superority' is not a kind of claim; "
                               "did you mean 'superiority'?"),
    (_with(kind="better"), "claims.items[0].kind: 'better' is not a kind of claim; expected one of superiority"),
    (_with(kind="non_inferiority"), "claims.items[0].margin: required for non_inferiority"),
    (_with(kind="equivalence", margin=0), "claims.items[0].margin: must be > 0 for equivalence"),
    (_with(margin=1), "claims.items[0].margin: expected a fraction of accuracy in [0, 0.5): 0.01 is 1 point"),
    (_with(margn=0.01), "suites/x.yaml: claims.items[0]: unknown key 'margn'; did you mean 'margin'?"),
    (_with(a={"methd": "sensitive"}), "claims.items[0].a: unknown key 'methd'; did you mean 'method'?"),
    (_with(b=None), "claims.items[0].b: required"),
    (_with(b={"method": "sensitive", "quant": "none"}), "claims.items[0]: a and b select the same cells"),
    (_with(metric="test"), "claims.items[0].metric: 'test' is not one of test_best, test_after"),
    (_with(target=0.7), "claims.items[0].target: only for kind faster_to_target"),
    (_with(id="Bad Id"), "claims.items[0].id: expected a short id"),
    (_with(id="sensitive-vs-full"), "claims.items[1].id: 'sensitive-vs-full' already used by items[0]"),
    ({**SECTION, "alpha": 0.5}, "suites/x.yaml: claims.alpha: expected a family-wise error rate in (0, 0.5)"),
    ({**SECTION, "alpha": 0}, "claims.alpha: expected a family-wise error rate"),
    ({**SECTION, "alpha": True}, "claims.alpha: expected a family-wise error rate"),
    ({**SECTION, "correction": "bonferroni"}, "claims.correction: 'bonferroni' is not one of holm, none"),
    ({**SECTION, "resamples": 100}, "claims.resamples: expected a whole number >= 1000"),
    ({**SECTION, "resamples": 10**13}, "claims.resamples: expected a whole number >= 1000 and <= 1,000,000"),
    ({**SECTION, "failed_if": {"accuracy_below": 0.5}}, "claims.failed_if: unknown key 'accuracy_below'"),
    ({**SECTION, "items": []}, "claims.items: expected a non-empty list of claims"),
    ({**SECTION, "failed_if": {"count_in_arm": "yes"}}, "claims.failed_if.count_in_arm: expected true or false"),
    ({**SECTION, "claims": []}, "claims: unknown key 'claims'"),
])
def test_bad_sections_fail_with_one_line_naming_the_key(data, message):
    with pytest.raises(UserError) as e:
        parse_claims(data, "suites/x.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_faster_to_target_needs_a_target_and_a_known_clock():
    data = copy.deepcopy(SECTION)
    del data["items"][2]["target"]
    with pytest.raises(UserError, match=r"items\[2\].target: required for faster_to_target"):
        parse_claims(data, "x")
    data["items"][2].update(target=0.7, clock="wall")
    with pytest.raises(UserError, match=r"items\[2\].clock: 'wall' is not one of step_forwards, train_s, "
                                        r"reference_forwards"):
        parse_claims(data, "x")
    data["items"][2].update(target=0.0, clock="step_forwards")
    with pytest.raises(UserError, match=r"items\[2\].target: expected b_best or an accuracy in \(0, 1\]"):
        parse_claims(data, "x")


def test_too_few_resamples_for_holms_strictest_level_are_refused():
    """A bootstrap p is at least 2 / resamples: 3 claims at alpha 0.05 need a p of 0.0167 at Holm's first
    step, so at least 120 replicates; the family's floor of 1000 covers up to 25 claims."""
    many = {**SECTION, "items": [{**SECTION["items"][0], "id": f"c{i}"} for i in range(30)]}
    with pytest.raises(UserError, match=r"claims.resamples: 10000 replicates cannot show a p below 0.0002, and "
                                        r"the strictest level a claim is tested at here is 0.00017: expected at "
                                        r"least 12000"):
        parse_claims({**many, "alpha": 0.005}, "x")
    assert len(parse_claims({**many, "resamples": 1200}, "x")) == 30
    with pytest.raises(UserError, match="expected at least 1200"):
        parse_claims({**many, "resamples": 1199}, "x")


def test_hash_ignores_key_order_spelling_and_selector_order():
    reordered = yaml.safe_load("""
items:
  - b: {quant: none, method: random}
    a: {quant: none, method: [sensitive]}
    kind: superiority
    margin: 0
    id: sensitive-beats-random
failed_if: {loss_rise_over_start: 5.0e-1, accuracy_at_most_majority_plus: 2.0e-2}
alpha: 5.0e-2
""")
    first, = parse_claims({**SECTION, "items": SECTION["items"][:1]}, "x")
    again, = parse_claims(reordered, "y")
    assert first.hash == again.hash and len(first.hash) == 64
    either = parse_claims(_with(b={"method": ["random", "magnitude"]}), "x")[0]
    other = parse_claims(_with(b={"method": ["magnitude", "random"]}), "x")[0]
    assert either.hash == other.hash


def test_hash_changes_with_anything_that_can_change_a_verdict():
    base = parse_claims(SECTION, "x")
    assert parse_claims(_with(margin=0.01), "x")[0].hash != base[0].hash
    for key, value in (("alpha", 0.01), ("seed", 1), ("resamples", 20000),
                       ("failed_if", {"accuracy_at_most_majority_plus": 0.05})):
        assert parse_claims({**SECTION, key: value}, "x")[0].hash != base[0].hash, key


def test_section_hash_covers_the_family_not_its_order():
    claims = parse_claims(SECTION, "x")
    assert claims_hash(claims) == claims_hash(list(reversed(claims)))
    assert claims_hash(claims) != claims_hash(claims[:2])  # Holm's family changed
