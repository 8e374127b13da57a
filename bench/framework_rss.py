"""Measure the per-process memory floor of a suite cell on this machine: everything but the model.

The memory estimator's calibration measures this once per machine and set of installed versions
(``zobench.driver.calibrate``, read by ``zobench.analysis.calibration``, cached under
``~/.cache/zobench/calibration``). This script runs the
same measurement on demand, more times, and prints the runs with the environment, e.g. to compare
machines or to record a CUDA floor on a GPU node:

    .venv/bin/python bench/framework_rss.py [--repeat 3] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from benchio import keep


def main(argv=None) -> int:
    from zobench.analysis.calibration import machine_key
    from zobench.driver import measure
    from zobench.measure.env import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    runs, hosts = measure(args.device, args.repeat)
    env = environment()
    out = {"device": args.device, "framework_peak_mib_median": statistics.median(runs), "runs_mib": runs,
           "host_rss_mib_median": statistics.median(h for h, _ in hosts),
           "calibration_key": machine_key(args.device),
           "env": {k: env.get(k) for k in ("cpu", "cpu_count", "torch_threads", "versions", "python", "gpu")}}
    print(json.dumps(out, indent=1))
    if args.json:
        keep(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
