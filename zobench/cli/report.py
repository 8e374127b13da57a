"""`zobench report RESULTS`: the markdown report with PNG plots beside it. Torch-free."""

from __future__ import annotations

from pathlib import Path

from zobench.cli.common import HELP
from zobench.errors import EXIT_OK
from zobench.outdirs import check_output_file
from zobench.report import render_results_file


def add_parser(sub) -> None:
    p = sub.add_parser("report", help=HELP["report"])
    p.add_argument("results")
    p.add_argument("--out", default="reports", help="report directory (default reports/): OUT/<results>.md")
    p.add_argument("--suite", default=None, help="the records' suite file, where the path they name does not "
                   "reach it from here (default: that path, from here or from the results folder's parent)")


def run(args) -> int:
    results = Path(args.results)
    check_output_file(Path(args.out) / f"{results.stem}.md", "report")
    print(write_report(results, Path(args.out), args.suite))
    return EXIT_OK


def write_report(results: Path, out_dir: Path, suite: str | None = None) -> Path:
    """The report of ``results`` in ``out_dir`` (named after the results file); also what a run ends with."""
    return render_results_file(results, Path(out_dir) / f"{Path(results).stem}.md", suite)
