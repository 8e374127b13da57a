"""`zobench estimate SUITE`: the predicted peak memory of every cell, from configs alone (no weights).

The estimator reads this machine's framework footprint; the driver measures it first where it never has
(``zobench.driver.calibrate``: one negligible cell, once per machine and installed versions).
"""

from __future__ import annotations

import json

from zobench.analysis import calibration, estimate
from zobench.analysis.estimate import describe, estimate_cell
from zobench.analysis.fits import host_need_mib
from zobench.cli.common import HELP
from zobench.driver import calibrate_cells
from zobench.errors import EXIT_OK, UserError
from zobench.measure.machine import available_memory_mib
from zobench.results import latest_by_cell
from zobench.spec.matrix import expand, select_cells
from zobench.spec.suite import load_suite


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help=HELP["estimate"])
    p.add_argument("suite")
    p.add_argument("--only", default=None, metavar="SELECTOR", help="e.g. method=sensitive,quant=nf4")
    p.add_argument("--json", action="store_true", help="machine-readable: one object per cell")


def run(args) -> int:
    suite = load_suite(args.suite)
    rows = []
    cells = select_cells(suite, args.only)
    calibrate_cells(cells)
    for cell in cells:
        row = {"cell_id": cell.cell_id, "labels": cell.labels}
        try:
            row.update(estimate_cell(cell.config))
        except UserError as e:  # one cell the estimator cannot price (e.g. unsupported) is not an error
            row["error"] = str(e)
        row["host_need_mib"] = host_need_mib(cell.config, row)  # what ``zobench run`` holds against memory here
        rows.append(row)
    available = available_memory_mib()
    for row in rows:
        row["fits_here"] = None if available is None or row["host_need_mib"] is None else \
            row["host_need_mib"] <= available[0]
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    names = [" ".join(f"{k}={v}" for k, v in r["labels"].items()) for r in rows]
    width = max([len("cell"), *map(len, names)])
    # The whole cell's peak is what a machine must hold; it can come before training (a model loaded whole
    # before it is quantized, a mask's gradients), so the phase is named when it is not the training's.
    print(f"{'cell':<{width}}  {'device':<6} {'train MiB':>9}  {'whole cell MiB':<20}  "
          f"main components of training (MiB)")
    for name, r in zip(names, rows):
        if "error" in r:
            print(f"{name:<{width}}  {'-':<6} {'-':>9}  {'-':<20}  {r['error']}")
        else:
            phase = max(r["phases"], key=r["phases"].get)
            whole = f"{r['cell_peak_mib']:.0f}" + (f" (in {phase})" if r["cell_peak_mib"] > r["peak_mib"] + 0.5 else "")
            print(f"{name:<{width}}  {r['device']:<6} {r['peak_mib']:>9.0f}  {whole:<20}  {describe(r)}")
    # Which constants each figure stands on: measured on this machine, or a default (CUDA without a GPU: the
    # floor measured on an H200).
    seen = {(r["device"], r["calibration"].get("quant", "none")): r for r in rows if "calibration" in r}
    for (device, quant), r in sorted(seen.items()):
        cal = r["calibration"]
        how = "measured on this machine" if cal.get("source") == "measured" else f"default ({cal.get('why')})"
        weights = f" with {quant} weights" if quant != "none" else ""
        floor = calibration.framework(device, quant)["framework_mib"]
        print(f"framework footprint on {device}{weights}: {floor:.0f} MiB, {how}")
    if available is not None:
        over = [name for name, r in zip(names, rows) if r["fits_here"] is False]
        print(f"this machine has {available[0]:,.0f} MiB available ({available[1]}): " + (
            f"{len(over)} cell(s) would not start here (zobench run records them as unsupported): {'; '.join(over)}"
            if over else "every cell's estimate fits in it"))
    return EXIT_OK


def estimate_missing(suite, records) -> tuple[list, list[str]]:
    """``zobench check``'s estimates of the suite's cells without an ok record (``analysis.estimate``), the
    machine calibrated first for the devices they need."""
    ok = {r.cell_id for r in latest_by_cell(records) if r.ok}
    cells = (estimate.with_chosen_lr(c, suite, records)[0] for c in expand(suite))
    calibrate_cells([c for c in cells if c.cell_id not in ok])
    return estimate.estimate_missing(suite, records)
