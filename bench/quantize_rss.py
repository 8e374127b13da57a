"""Benchmark: where a cell's quantize phase holds its memory on a CPU, stage by stage.

    python bench/quantize_rss.py [--suite suites/smollm2-quant.yaml] [--only quant=gptq,method=forward]

Runs the one selected cell in this process, under the environment a cell process gets (``procs.child_env()``,
``malloc: release``: re-executes itself with it) and with a fresh cache for quantized layers and masks (a
temporary ``ZOBENCH_CACHE`` beside the converted models, which are linked, not copied), and samples the
resident set every 20 ms during the quantize phase. Prints the anonymous and file-backed parts (``RssAnon``
/ ``RssFile``: a checkpoint's mapped pages are file-backed) when the phase starts, at every tenth layer the
backend installs, and when the phase ends, then the phase's peak against the estimator's. Linux only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) // 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="suites/smollm2-quant.yaml")
    ap.add_argument("--only", default="quant=gptq,method=forward")
    args = ap.parse_args()

    from zobench.procs import child_env
    cell_env = child_env()  # a cell's at the default malloc: release
    if any(os.environ.get(k) != v for k, v in cell_env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **cell_env})
    from zobench.analysis.estimate import estimate_cell
    from zobench.cell.pipeline import Pipeline
    from zobench.driver import calibrate_cells
    from zobench.files import cache_dir
    from zobench.spec.matrix import select_cells
    from zobench.spec.suite import load_suite

    cells = select_cells(load_suite(args.suite), args.only)
    if len(cells) != 1:
        sys.exit(f"--only must select one cell of {args.suite}; it selects {len(cells)}")
    cfg = cells[0].config
    calibrate_cells(cells)  # the estimate on this machine's measured floor (kept in the real cache)
    estimated = estimate_cell(cfg)["phases"]["quantize"]
    fresh = Path(tempfile.mkdtemp(prefix="zobench-quantize-rss-"))
    if (cache_dir() / "models").is_dir():
        (fresh / "models").symlink_to(cache_dir() / "models")
    os.environ["ZOBENCH_CACHE"] = str(fresh)
    samples, marks, done = [], [], threading.Event()

    def sample():
        while not done.is_set():
            samples.append(_status()["VmRSS"])
            time.sleep(0.02)

    def mark(what: str) -> None:
        marks.append((what, _status()))

    installed = [0]

    def count(module, name, value):
        installed[0] += 1
        if installed[0] % 10 == 0:
            mark(f"{installed[0]} layers quantized")

    pipeline = Pipeline(cfg)
    quantize = pipeline.quantize

    def phase() -> None:
        mark("phase starts")
        threading.Thread(target=sample, daemon=True).start()  # sampled during this phase only
        remove = _register_setattr_hook(count)  # streamed or whole, every layer the backend swaps in
        try:
            quantize()
        finally:
            remove()
            done.set()
        mark("phase ends")

    pipeline.quantize = phase
    try:
        record = pipeline.run()
    finally:
        done.set()
        shutil.rmtree(fresh, ignore_errors=True)  # its own temporary cache (the models are only linked)
    print(f"{cells[0].describe()}: {record.status}")
    for what, s in marks:
        print(f"  {what:<22} RSS {s['VmRSS']:>6} MiB  anonymous {s['RssAnon']:>6}  file-backed {s['RssFile']:>6}")
    measured = record.phases["quantize"].peak_rss_mib
    print(f"quantize phase peak {measured:.0f} MiB (sampled {max(samples):.0f}), estimated {estimated:.0f} "
          f"({(estimated - measured) / measured:+.1%})")


def _register_setattr_hook(hook):
    """Call ``hook(module, name, value)`` whenever a float ``nn.Linear`` held by a module is replaced by another
    kind of layer (not when a streamed model's deferred linear arrives); returns the function that removes it."""
    import torch

    original = torch.nn.Module.__setattr__

    def setattr_(self, name, value):
        old = self._modules.get(name) if "_modules" in self.__dict__ else None
        if type(old) is torch.nn.Linear and type(value) is not torch.nn.Linear:
            hook(self, name, value)  # a float linear replaced by the backend's layer
        original(self, name, value)

    torch.nn.Module.__setattr__ = setattr_
    return lambda: setattr(torch.nn.Module, "__setattr__", original)


if __name__ == "__main__":
    main()
