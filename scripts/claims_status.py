"""Print, or put in the README, a claims suite's status made from its records (zobench/report/status.py).

    python scripts/claims_status.py results/claims-v2.jsonl suites/claims-v2.yaml             # print it
    python scripts/claims_status.py results/claims-v2.jsonl suites/claims-v2.yaml --readme README.md

With --readme, the block between the README's markers for these two files is replaced; nothing else is
touched. Run it after the records change (tests/test_readme_status.py fails until it is).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zobench.errors import UserError
from zobench.files import MAX_CONFIG_BYTES, atomic_write, read_text
from zobench.outdirs import check_output_file
from zobench.report.status import replace_block, status_block
from zobench.results import load_records
from zobench.spec.suite import load_suite


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("suite")
    p.add_argument("--readme", default=None, help="replace the generated block in this file")
    args = p.parse_args(argv)
    try:
        block = status_block(load_records(args.results), load_suite(args.suite), Path(args.results).parent)
        if args.readme is None:
            print(block)
            return 0
        check_output_file(args.readme, "README")  # a link is refused, not replaced by a file
        text = read_text(args.readme, "README", 16 * MAX_CONFIG_BYTES)
        new = replace_block(text, block, args.results, args.suite, args.readme)
        if new != text:
            atomic_write(args.readme, new, "README")
        print(f"{args.readme}: {'updated' if new != text else 'already up to date'}")
    except UserError as e:
        print(f"claims_status: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
