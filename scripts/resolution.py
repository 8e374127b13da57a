"""What a claims suite's design resolves, measured on its own records (zobench.analysis.design.resolution).

    python scripts/resolution.py results/quantized-zo.jsonl suites/quantized-zo.yaml [--margin 2] [--seeds 6,12,40]

For each accuracy claim whose arms share at least 2 seeds: where the variance of its difference comes from
(seeds, test examples, one run's noise on one example), the interval's expected half-width now, at more
seeds and in the limit (any number of seeds on this test set), and how many seeds per arm a non-inferiority
margin of --margin points would need if the true difference were the measured one, or 0. Half-widths are at
the claim's level and at alpha / k (the first step of Holm over the suite's k claims, the strictest a claim
faces). A projection from few seeds is rough: the seed component has seeds - 1 degrees of freedom.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from zobench.analysis.verdicts import verdicts
from zobench.errors import UserError
from zobench.results import load_records
from zobench.spec.suite import load_suite


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seed counts like 6,12,40, got {text!r}") from None
    if not seeds or min(seeds) < 2:
        raise argparse.ArgumentTypeError("every seed count must be at least 2")
    return seeds


def claim_lines(res, result, name: str, alpha_k: float, margin: float, more: list[int]) -> list[str]:
    """One claim's account (points of accuracy), ``res`` its Resolution, ``result`` its verdict (or None)."""
    s, e = res.n_seeds, res.n_examples
    share = res.shares()
    alpha = result.alpha if result is not None else 0.05

    def hw(n):
        return f"{100 * res.half_width(n, alpha=alpha):.1f} ({100 * res.half_width(n, alpha=alpha_k):.1f})"

    at = "; ".join(f"{n} seeds {hw(n)}" for n in more if n != s)
    extra = f"; the verdict reads {result.n_seeds[0]} and {result.n_seeds[1]}" \
        if result is not None and tuple(result.n_seeds) != (s, s) else ""
    lines = [f"- {name} ({s} seeds paired x {e} test examples{extra}):",
             f"  - variance of the difference now: {100 * share[0]:.0f}% from seeds, {100 * share[1]:.0f}% from "
             f"the test examples, {100 * share[2]:.0f}% from each run's own noise on each example",
             f"  - expected half-width, points, at {100 * (1 - alpha):g}% ({100 * (1 - alpha_k):.4g}%): now "
             f"{hw(s)}; {at + '; ' if at else ''}any number of seeds on these {e} examples {hw(math.inf)}"]
    if res.seed_clamped:
        lines.append(f"  - the seed component came out at or below 0 from {s} seeds and is taken as 0: the projections "
                     f"to more seeds leave out a seed spread {s} seeds could not show, so they may be optimistic")
    if result is not None and math.isfinite(result.estimate):
        lines.append(f"  - the verdict's interval now: {100 * result.estimate:+.1f} [{100 * result.ci_low:+.1f}, "
                     f"{100 * result.ci_high:+.1f}] (half-width {50 * (result.ci_high - result.ci_low):.1f})")
        for diff, what in ((result.estimate, "the measured difference"), (0.0, "no difference")):
            need = margin / 100 + diff  # a - b > -margin needs the interval's half-width under margin + diff
            head = f"  - within {margin:g} points (lower bound above -{margin:g}) at {what} ({100 * diff:+.1f}): "
            if need <= 0:
                lines.append(head + "out of reach at any design (the difference itself is past the margin)")
                continue
            n = res.seeds_for(need, alpha=alpha_k)
            lines.append(head + f"needs a half-width under {100 * need:.1f} at {100 * (1 - alpha_k):.4g}% (to hold "
                         f"half the time): " + (f"{n} seeds per arm" if n else f"no number of seeds on {e} test "
                                                f"examples"))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("suite")
    p.add_argument("--margin", type=float, default=2.0, help="a non-inferiority margin to size, in points")
    p.add_argument("--seeds", type=_seeds, default=[6, 12, 40], help="seed counts to project to, e.g. 6,12,40")
    args = p.parse_args(argv)
    try:
        suite = load_suite(args.suite)
        records = load_records(args.results)
        folder = Path(args.results).parent
        decision = verdicts(records, suite.claims, folder)
        if decision is None:
            raise UserError(f"suite '{suite.name}' declares no claims")
        by_id = {r.claim: r for r in decision.results}
        alpha_k = min(c.alpha for c in suite.claims) / len(suite.claims)
        print(f"What `{suite.name}`'s design resolves, from its records (points of accuracy; half-widths at each "
              f"claim's level, in brackets at Holm's first step over its {len(suite.claims)} claims):\n")
        for claim in suite.claims:
            if claim.kind == "faster_to_target":
                continue
            res = decision.resolutions.get(claim.id)
            if res is None:
                print(f"- {claim.name}: fewer than 2 seeds run by both arms, nothing to project from")
                continue
            print("\n".join(claim_lines(res, by_id.get(claim.id), claim.name, alpha_k, args.margin, args.seeds)))
    except UserError as e:
        print(f"resolution: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
