"""`zobench check RESULTS`: exit 1 when a budget is broken. Torch-free on records (``--measured-only``);
cells without an ok record are checked by their estimates, which import torch and, on a machine not yet
calibrated, run the estimator's calibration cell: that step is resolved by name (``STEPS``) only when it
is taken."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from zobench.analysis.check import check
from zobench.cli.common import HELP
from zobench.errors import EXIT_BUDGET, EXIT_OK, UserError
from zobench.registry import Registry
from zobench.results import load_records
from zobench.spec.suite import load_suite, suite_file_places

STEPS = Registry("check step")
STEPS.register("estimate missing", "zobench.cli.estimate:estimate_missing")


def add_parser(sub) -> None:
    p = sub.add_parser("check", help=HELP["check"])
    p.add_argument("results", nargs="?", default=None,
                   help="results JSONL (optional with --suite: then every cell is checked by its estimate)")
    p.add_argument("--suite", default=None, help="default: the suite file named in the records")
    p.add_argument("--baseline", default=None, help="records from the same machine to compare latency with")
    p.add_argument("--measured-only", action="store_true",
                   help="do not check cells without an ok measured record by their estimates")


def run(args) -> int:
    if args.results is None and not args.suite:
        raise UserError("check: give a results file, or --suite SUITE.yaml to check the suite by estimates")
    records = load_records(args.results) if args.results else []
    # The records live until the process ends: the collector's later full passes (importing torch for the
    # estimates allocates a lot) need not walk them again (a third of checking 100,000 records).
    gc.freeze()
    suite_path = args.suite
    if not suite_path:
        named = next((r.suite_file for r in records if r.suite_file), None)
        if not named:
            raise UserError(f"{args.results}: records name no suite file; pass --suite SUITE.yaml")
        # named as `zobench run` was given it: from here, or from where that ran (above the results folder)
        suite_path = next(iter(suite_file_places(named, Path(args.results).parent)), named)
    suite = load_suite(suite_path)
    baseline = load_records(args.baseline) if args.baseline else None
    estimates: list = []
    if not args.measured_only and suite.budgets:  # estimates are held to budgets; without any, no need
        estimates, lines = STEPS.get("estimate missing")(suite, records)
        for line in lines:
            print(line)
    violations, notes = check(records, suite, baseline, estimates)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    for v in violations:
        print(v.line())
    if not violations:
        what = args.results or f"{suite_path} (no results)"
        extra = f"; {len(estimates)} cell(s) by estimate, peak_mib_max only" if estimates else ""
        if not suite.budgets:  # nothing to hold: say so, not "0 budgets hold"
            print(f"ok: {suite_path} declares no budgets; nothing to check for {what}")
        else:
            print(f"ok: {len(suite.budgets)} budget(s) hold for {what}{extra}")
    return EXIT_BUDGET if violations else EXIT_OK
