"""Recompute a suite's claims table from its records alone (and the predictions files beside them).

    python scripts/reanalyze_claims.py results/claims.jsonl [--current suites/claims.yaml]

Uses the claims the records themselves carry (as their suite declared them when they ran), not the suite
file, so it reproduces the verdicts of the data as collected; ``--current`` decides the claims as a suite file
declares them now instead. Prints the same markdown as the report's Claims section.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zobench.analysis.verdicts import claims_of, verdicts
from zobench.errors import UserError
from zobench.report.claims import claims_section
from zobench.report.header import cells_without_record
from zobench.results import load_records
from zobench.spec.suite import load_suite


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--current", default=None, help="decide the claims as this suite file declares them now")
    args = p.parse_args(argv)
    try:
        records = load_records(args.results)
        suite = load_suite(args.current) if args.current else None
        claims = suite.claims if suite else next((c for r in reversed(records) if (c := claims_of(r))), [])
        if not claims:
            raise UserError(f"{args.results}: its records carry no declared claims")
        decision = verdicts(records, claims, Path(args.results).parent)
    except UserError as e:
        print(f"reanalyze_claims: error: {e}", file=sys.stderr)
        return 2
    dirty = sorted({r.cell_id for r in records if (r.git or {}).get("dirty")})
    missing = cells_without_record(suite, records)  # with --current: the suite's cells not in yet (interim)
    print("\n".join(claims_section(decision, {c.id: c.name for c in claims}, dirty, missing)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
