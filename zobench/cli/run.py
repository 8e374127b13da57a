"""`zobench run SUITE`: every cell in a fresh process, then the report; `--dry-run` lists the cells.

Torch-free until a suite runs: the runners (the driver, which estimates every cell and starts the
executors; an influence suite's, which runs in this process) import torch, and are resolved by name
(``SUITE_RUNNERS``) only when a suite is run, so ``--dry-run`` never loads them.
"""

from __future__ import annotations

from pathlib import Path

from zobench.cli.common import HELP, trust_flag
from zobench.cli.report import write_report
from zobench.errors import EXIT_CELLS_FAILED, EXIT_OK, UserError
from zobench.executors import EXECUTORS
from zobench.measure.machine import git_state
from zobench.outdirs import check_output_dir, check_output_file, output_lock
from zobench.progress import SuiteProgress
from zobench.registry import Registry
from zobench.report import plots_folder
from zobench.report.owned import replaceable_plots
from zobench.results import append_record
from zobench.spec.influence import is_influence_suite, parse_influence_suite
from zobench.spec.matrix import select_cells
from zobench.spec.pilot import pilot_cells
from zobench.spec.suite import parse_suite
from zobench.spec.yaml_text import load_yaml

# A kind of suite -> its runner, imported when such a suite is run (it needs torch): a suite's cells through
# the driver; an influence suite in this process.
SUITE_RUNNERS = Registry("suite type")
SUITE_RUNNERS.register("cells", "zobench.driver:run_suite")
SUITE_RUNNERS.register("influence", "zobench.influence.bench:run_influence_suite")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help=HELP["run"])
    p.add_argument("suite")
    p.add_argument("--out", default="results", help="results directory (default results/)")
    p.add_argument("--reports", default="reports", help="report directory (default reports/)")
    p.add_argument("--resume", action="store_true", help="skip cells that already have an ok record")
    p.add_argument("--only", default=None, metavar="SELECTOR", help="e.g. method=sensitive,quant=nf4|int8")
    p.add_argument("--dry-run", action="store_true", help="print the expanded cells and exit")
    p.add_argument("--strict", action="store_true", help="exit 3 if any cell failed")
    p.add_argument("--overwrite", action="store_true", help="replace deltas a suite's `save:` finds already there")
    p.add_argument("--allow-dirty", action="store_true",
                   help="run a suite that declares claims although zobench's code differs from its commit")
    trust_flag(p)
    p.add_argument("--jobs", type=int, default=1, help="cells at once on this machine, each in its own process")
    p.add_argument("--no-memory-check", action="store_true",
                   help="start every cell, also one whose estimated peak is more than the memory this machine "
                        "has available when its turn comes (by default such a cell is recorded as "
                        "unsupported, with both figures, and not started)")
    p.add_argument("--executor", default=None,
                   help="local (default) | pool (the default with --jobs > 1) | ray (needs zobench[ray])")
    p.add_argument("--address", default=None,
                   help="with --executor ray: an existing cluster (auto, ray://HOST:10001); else a private "
                        "local Ray")
    p.add_argument("--retries", type=int, default=2,
                   help="with --executor ray: retries of a cell whose worker or node died (default 2)")


def run(args) -> int:
    data = load_yaml(args.suite)
    if is_influence_suite(data):
        return _run_influence(parse_influence_suite(data, args.suite, Path(args.suite)), args)
    suite = parse_suite(data, args.suite, Path(args.suite))
    _check_flags(args)  # a dry run says what a run would refuse
    if args.dry_run:
        return _dry_run(suite, args.only)
    results = _check_outputs(args, suite.name)
    if suite.claims and not args.allow_dirty and git_state().get("dirty"):
        raise UserError(f"{args.suite}: declares claims, and zobench's code differs from its commit "
                        f"{git_state().get('commit', '?')[:12]}: its records could not say which code made "
                        f"them. Commit (or run from a clean worktree), or pass --allow-dirty")
    with output_lock(results):  # one writer per results file: every cell recorded exactly once
        executor = _executor(args)
        run_suite = SUITE_RUNNERS.get("cells")
        with SuiteProgress() as progress:
            out = run_suite(suite, Path(args.out), resume=args.resume, only=args.only, reporter=progress,
                            executor=executor, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    progress.console.print(progress.summary())
    report = write_report(out, Path(args.reports))
    print(f"results: {out}\nreport:  {report}")
    failed = [r for r in progress.records if r.status not in ("ok", "unsupported")]
    return EXIT_CELLS_FAILED if failed and args.strict else EXIT_OK


def _dry_run(suite, only: str | None) -> int:
    cells = select_cells(suite, only)
    if suite.lr_pilot is not None:
        pilots = pilot_cells(cells, suite.lr_pilot)
        for c in pilots:
            print(f"{c.cell_id}  {c.describe()}")
        print(f"{len(pilots)} pilot cells ({suite.lr_pilot.steps} steps each) choose the lr of:")
    for c in cells:
        print(f"{c.cell_id}  {c.describe()}")
    print(f"{len(cells)} cells")
    return EXIT_OK


def _check_flags(args) -> str:
    """The executor's name, once its flags are checked."""
    name = args.executor or ("pool" if args.jobs > 1 else "local")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: expected a number of cells >= 1")
    if args.address and name != "ray":
        raise UserError(f"--address {args.address}: only --executor ray joins a cluster")
    if args.retries < 0:
        raise UserError(f"--retries {args.retries}: expected a number of retries >= 0")
    if args.no_memory_check and name == "ray":
        raise UserError("--no-memory-check: Ray places each cell by its estimated memory itself; the flag is for "
                        "cells run on this machine (--executor local or pool)")
    return name


def _executor(args):
    name = _check_flags(args)
    cls = EXECUTORS.get(name)
    if name == "ray":  # Ray places each cell by its estimate (``ray_executor.resources``)
        return cls(jobs=args.jobs, address=args.address, max_retries=args.retries)
    return cls(jobs=args.jobs, memory_check=not args.no_memory_check)


def _check_outputs(args, name: str) -> Path:
    """Every place a run writes is writable before the first cell starts: a measurement that cannot be
    saved is never taken. Returns the results file."""
    results = check_output_file(Path(check_output_dir(args.out, "results")) / f"{name}.jsonl", "results file")
    report = check_output_file(Path(check_output_dir(args.reports, "reports")) / f"{name}.md", "report")
    replaceable_plots(report, plots_folder(report))  # a file zobench would not replace: said now, not hours on
    return results


def _run_influence(suite, args) -> int:
    if args.dry_run:
        print(f"influence suite {suite.name}: {suite.n_train} examples, scope {suite.cache.get('scope', 'lora')}")
        return EXIT_OK
    out = _check_outputs(args, suite.name)
    with output_lock(out):
        run_influence_suite = SUITE_RUNNERS.get("influence")
        rec = run_influence_suite(suite, Path(args.out), progress=lambda msg: print(f"  {msg}", flush=True))
        append_record(out, rec)
    report = write_report(out, Path(args.reports))
    print(f"results: {out}\nreport:  {report}")
    return EXIT_OK
