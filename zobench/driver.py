"""Run a suite: expand it into cells, hand them to an executor, append each record as it comes back.

    suite YAML --spec--> Suite --matrix--> [Cell, ...] --executor--> one fresh process per cell
    driver: finalize(record) -> results.append_record -> results/<suite>.jsonl

The driver is the only writer of the results file: an executor returns records, the driver adds what it
alone knows (suite, environment, git state, the cell's memory estimate) and appends each exactly once.
Ratios are not computed here; readers derive them from the whole file (``zobench.results.derive``).

It is also the only part of zobench besides the executors that launches cells: GGUF conversions before
the first cell (``prepare_models``), and the estimator's calibration cell (``calibrate``), which every
command that estimates runs first (the estimator itself only reads the figure:
``zobench.analysis.calibration``).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from zobench.analysis import calibration
from zobench.analysis.estimate import device_of, record_estimate
from zobench.cell.delta import claim_target
from zobench.cell.measures import now
from zobench.cell.record import CellRecord
from zobench.errors import Unsupported
from zobench.executors.base import Executor
from zobench.executors.local import LocalExecutor
from zobench.files import atomic_write
from zobench.measure.env import environment
from zobench.measure.machine import git_state
from zobench.models.load import converted_gguf_dir, pending_conversion
from zobench.procs import child_env, die_with_parent
from zobench.quant import get_backend
from zobench.results import TRAIN_PHASES, append_record, load_records, train_peak_mib
from zobench.spec.claims import claims_hash
from zobench.spec.matrix import Cell, expand, select_cells
from zobench.spec.pilot import choose, pilot_cells
from zobench.spec.suite import Suite, parse_suite

__all__ = ["calibrate", "calibrate_cells", "finalize", "prepare_models", "run_suite", "select_cells"]


def suite_claims(suite: Suite) -> dict | None:
    """What a record says of the claims its suite declared when it ran: their hash (``spec.claims``)."""
    claims = suite.claims
    return {"hash": claims_hash(claims), "declared": [asdict(c) for c in claims]} if claims else None


def _convert(gguf: str, parent: int) -> None:
    die_with_parent(parent)  # a run killed outright (SIGKILL) leaves no conversion writing on
    converted_gguf_dir(Path(gguf))


def prepare_models(cells: list[Cell]) -> None:
    """Convert GGUF models (the embedded default among them) once, before any cell runs.

    The first load of a GGUF file de-quantizes and converts it; done inside a measured cell, that cost
    and the modules it imports (about 70 MiB that stay resident) would land in the cell's peak, so the
    first cell on a new machine measured differently from every later one. It runs in a process of its
    own; a failure is left for the cell to report.
    """
    specs = {s for c in cells for s in (c.config.model, c.config.model_fallback) if s}
    for gguf in sorted({p for p in map(pending_conversion, sorted(specs)) if p is not None}):
        print(f"zobench: converting {gguf.name} to safetensors once (kept in the cache)", file=sys.stderr,
              flush=True)
        proc = mp.get_context("spawn").Process(target=_convert, args=(str(gguf), os.getpid()), daemon=True)
        proc.start()
        proc.join()


def relative_to_results(path: str, results: Path) -> str:
    """A file a cell wrote, named relative to the results file's folder (results move as one folder)."""
    return os.path.relpath(path, Path(results).resolve().parent)


def finalize(rec: CellRecord, cell: Cell, suite: Suite, started: str, env: dict, git: dict,
             out: Path | None = None) -> CellRecord:
    """What the driver adds to an executor's record: suite, labels, environment, and the estimate."""
    rec.cell_id, rec.labels, rec.config = cell.cell_id, cell.labels, cell.config.to_dict()
    rec.config.pop("checkpoint", None)  # where progress was kept while it ran: gone once the record is
    rec.config.pop("predictions", None)  # named by rec.predictions, relative to the results file
    if rec.predictions and out is not None:
        rec.predictions["path"] = relative_to_results(rec.predictions["path"], out)
    rec.claims = suite_claims(suite)
    rec.suite, rec.suite_file = suite.name, str(suite.path) if suite.path else None
    rec.env, rec.git, rec.started_at, rec.finished_at = env, git, started, now()
    # The predicted peak beside the measured one (reports show both); never raises: a failed estimate is
    # stored as {"error": ...} and the record stands.
    rec.estimate = record_estimate(cell.config)
    return rec


def run_suite(suite: Suite, out_dir: Path, resume: bool = False, only: str | None = None, reporter=None,
              executor: Executor | None = None, cells: list[Cell] | None = None, overwrite: bool = False,
              trust_remote_code: bool = False) -> Path:
    """Run the suite's cells (``cells``: these, in this order, instead of the suite's); returns the results
    path. With an ``lr_pilot``, its pilot cells run first and choose each cell's learning rate.
    ``reporter(event, data)`` gets "suite", "start", "progress", "done" and "waiting" (cells held back until
    every pilot of their lr grid has a dev score) events. ``overwrite`` and
    ``trust_remote_code`` come from the command line only (no suite file can set them): replace deltas a
    cell's ``save:`` finds already there; let models run their own code."""
    out = Path(out_dir) / f"{suite.name}.jsonl"
    cells = select_cells(suite, only) if cells is None else cells
    env, git = environment(), git_state()
    if env.get("gpu"):
        env["cuda_alloc_conf"] = child_env()["PYTORCH_CUDA_ALLOC_CONF"]
    run = Batch(suite, out, env, git, resume, reporter or (lambda *a: None), executor or LocalExecutor())
    run.granted = {"overwrite": overwrite, "trust_remote_code": trust_remote_code}
    with run.executor:
        if suite.lr_pilot is not None:
            run.cells(pilot_cells(cells, suite.lr_pilot), "pilot", then=run.after_pilots(cells))
            waiting = len(cells)
            cells, run.choices = choose(cells, suite.lr_pilot, load_records(out) if out.exists() else [])
            if len(cells) < waiting:
                run.reporter("waiting", {"cells": waiting - len(cells)})
        run.cells(cells, "cells")
    return out


def _families(cells: list[Cell]) -> dict[str, int]:
    """Steps of ``cells`` by method family ("zo", "fo", "reference"), for the progress lines: a reference
    forward cell's step costs a forward, a ZO step two and more, so each family gets its own pace."""
    steps: dict[str, int] = {}
    for c in cells:
        family = c.config.method_info.family
        steps[family] = steps.get(family, 0) + c.config.steps
    return steps


class Batch:
    """Cells handed to one executor, each record finalized and appended as it comes back."""

    def __init__(self, suite: Suite, out: Path, env: dict, git: dict, resume: bool, reporter, executor):
        self.suite, self.out, self.env, self.git, self.resume = suite, out, env, git, resume
        self.reporter, self.executor, self.choices = reporter, executor, {}
        self.granted: dict = {}  # settings only the command line gives (run_suite)
        self.checkpoints = out.with_name(f"{out.stem}.checkpoints")  # results/NAME.checkpoints/CELL.json

    def _placed(self, cell: Cell) -> Cell:
        """The cell as it runs: the command line's grants applied, its delta (if it keeps one) at
        ``save/<cell id>``, refused before anything runs when that directory is not free to take."""
        config = dataclasses.replace(cell.config, **self.granted)
        if config.save:
            target = Path(config.save) / cell.cell_id
            claim_target(target, config.overwrite, "save:")
            config = dataclasses.replace(config, save=str(target))
        return Cell(cell.cell_id, config, cell.labels)

    def _records(self) -> list[CellRecord]:
        return load_records(self.out) if self.resume and self.out.exists() else []

    def after_pilots(self, cells: list[Cell]) -> dict:
        """What is left for the cells stage while the pilots run, for the progress lines: ``{"cells": n,
        "steps": s}``, the cells whose pilots have chosen their lr and that have a record not counted."""
        records = self._records()
        chosen, _ = choose(cells, self.suite.lr_pilot, records)
        done = {r.cell_id for r in records if r.ok} & {c.cell_id for c in chosen}
        families, recorded = _families(cells), _families([c for c in chosen if c.cell_id in done])
        families = {f: n - recorded.get(f, 0) for f, n in families.items() if n - recorded.get(f, 0)}
        return {"cells": len(cells) - len(done), "steps": sum(families.values()), "families": families}

    def cells(self, cells: list[Cell], what: str, then: dict | None = None) -> None:
        """Run ``cells`` (``what``: "pilot" or "cells", for the progress lines; ``then``: the stage to come,
        ``after_pilots``)."""
        done = {r.cell_id for r in self._records() if r.ok}
        todo = [self._placed(c) for c in cells if c.cell_id not in done]
        prepare_models(todo)
        calibrate_cells(todo)  # measured once per machine, before the cells: their records carry estimates
        self.reporter("suite", {"total": len(cells), "todo": len(todo), "skipped": len(cells) - len(todo),
                                "what": what, "steps": sum(c.config.steps for c in todo),
                                "families": _families(todo), "then": then})
        started: dict[str, tuple[str, float]] = {}

        def on_event(kind: str, data: dict) -> None:
            if kind == "start":
                started[data["cell"].cell_id] = (now(), time.monotonic())
            self.reporter(kind, data)

        self.executor.on_event = on_event
        for cell in todo:
            # A long cell keeps its progress (zobench.cell.checkpoint): --resume goes on from it; a fresh
            # run starts every cell from step 0.
            progress = self.checkpoints / f"{cell.cell_id}.json"
            if not self.resume:
                progress.unlink(missing_ok=True)
            predictions = self.out.with_name(f"{self.out.stem}.predictions") / f"{cell.cell_id}.npz"
            cell = Cell(cell.cell_id, dataclasses.replace(cell.config, checkpoint=str(progress.resolve()),
                                                          predictions=str(predictions.resolve())), cell.labels)
            self.executor.submit(cell, cell.config.timeout_s or self.suite.timeout_s)
        for cell, rec in self.executor.finished():
            at, t0 = started.get(cell.cell_id, (now(), time.monotonic()))
            rec = finalize(rec, cell, self.suite, at, self.env, self.git, self.out)
            rec.wall_s, rec.lr_choice = time.monotonic() - t0, self.choices.get(cell.cell_id)
            append_record(self.out, rec)
            if rec.ok:
                Path(cell.config.checkpoint).unlink(missing_ok=True)
            self.reporter("done", {"cell": cell, "record": rec})


# -- the estimator's calibration (zobench.analysis.calibration reads what this measures) ---------------------
# Weights of this model: about 3k values (vocab 64 x hidden 16, one layer): nothing against the floor.
NEGLIGIBLE_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
    "vocab_size": 64, "max_position_embeddings": 512, "tie_word_embeddings": True, "pad_token_id": 2,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "rms_norm_eps": 1e-5,
}


def calibrate_cells(cells: list[Cell]) -> None:
    """``calibrate`` every device the cells' estimates will ask for (``auto`` as it resolves here), and on a
    CPU every quant backend whose floor is measured with it (``calibration.floor_quant``) and runs here. The
    plain floor always: a quantized cell's load and mask phases come before its backend is imported and are
    priced on it (``analysis.phase_estimate``); a suite of quantized cells only, on a fresh cache, priced
    them on the default footprint (385 MiB, where this machine measures ~430) and said the calibration was
    measured."""
    wanted = set()
    for c in cells:
        device = device_of(c.config)
        wanted |= {(device, "none"), (device, calibration.floor_quant(device, c.config.quant))}
    for device, quant in sorted(wanted):
        if quant == "none" or _runs_here(quant, device):
            calibrate(device, quant)


def _runs_here(quant: str, device: str) -> bool:
    try:
        get_backend(quant).check_available(device)
        return True
    except Unsupported:  # its cells will say so; their estimates use the plain floor
        return False


def calibrate(device: str = "cpu", quant: str = "none") -> dict:
    """The framework footprint for estimates on ``device`` (``analysis.calibration.framework``), measured
    first where this machine and these versions have none: a negligible forward cell (quantized by ``quant``
    where the floor is measured with it), ``REPEATS`` times, cached. Without a GPU, "cuda" is the recorded
    H200 figure: nothing runs."""
    quant = calibration.floor_quant(device, quant)
    if calibration.needs_measuring(device, quant):
        calibration.remember(device, _measure_and_store(device, quant), quant)
    return calibration.framework(device, quant)


def _measure_and_store(device: str, quant: str = "none") -> dict:
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    key = calibration.machine_key(device, quant)
    what = "framework footprint" + (f" with {quant} weights" if quant != "none" else "")
    print(f"zobench: measuring this machine's {what} for the memory estimator (once, ~20 s)",
          file=sys.stderr, flush=True)
    try:
        peaks, hosts = measure(device, calibration.REPEATS, quant)
    except Exception as e:  # never fail an estimate on its calibration: fall back, and say why
        why = f"calibration failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        if quant != "none":  # the plain floor stands in
            print(f"zobench: warning: {what}: {why}; using the plain footprint", file=sys.stderr)
            return calibration.framework(device)
        print(f"zobench: warning: {why}; using the default footprint", file=sys.stderr)
        return {"framework_mib": calibration.FALLBACKS[device][0], "source": "default", "why": why}
    data = {"framework_mib": round(statistics.median(peaks), 3), "source": "measured", "key": key,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs_mib": peaks,
            **({"quant": quant} if quant != "none" else {})}
    if device == "cuda":  # the host side of a GPU cell's process, for the estimates' host phases
        data["host_mib"] = round(statistics.median(h for h, _ in hosts), 3)
        data["host_load_mib"] = round(statistics.median(h for _, h in hosts), 3)
    else:  # the load phase's own floor: its data and tokenizer transients, no forward's kernel state
        data["load_mib"] = round(statistics.median(h for _, h in hosts), 3)
    try:
        atomic_write(calibration.path_of(key), json.dumps(data, indent=1), "calibration")
    except Exception:  # an unwritable cache: use the measurement now, measure again next time
        pass
    return data


def measure(device: str = "cpu", repeats: int = calibration.REPEATS,
            quant: str = "none") -> tuple[list[float], list[float]]:
    """Train-phase peaks (MiB) of ``repeats`` negligible forward cells, each in a fresh process, and their
    (train-phase, load-phase) peak RSS (on a CPU the first is the same figure; on a GPU, the host side)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "negligible-llama.json"
        config.write_text(json.dumps(NEGLIGIBLE_LLAMA))
        suite = parse_suite({"name": "framework", "reference": False, "defaults": {
            "model": f"random:{config}", "method": "forward", "task": "sst2", "batch_size": 1,
            "max_length": 8, "n_train": 8, "n_dev": 0, "n_test": 0, "steps": 4, "warmup_steps": 1,
            "eval_before": False, "eval_after": False, "device": device, "quant": quant}}, "framework calibration")
        (cell,) = expand(suite)
        prepare_models([cell])
        peaks, hosts = [], []
        for _ in range(repeats):
            with LocalExecutor(memory_check=False) as executor:  # a negligible cell: nothing to estimate
                executor.submit(cell, 300)
                ((_, rec),) = list(executor.finished())
            if not rec.ok:
                raise RuntimeError(f"calibration cell {rec.status}: {rec.reason}")
            peaks.append(round(train_peak_mib(rec), 3))
            hosts.append((max(rec.phase(p).peak_rss_mib or 0.0 for p in TRAIN_PHASES),
                          rec.phase("load").peak_rss_mib or 0.0))
    return peaks, hosts


if __name__ == "__main__":  # python -m zobench.driver: measure the framework footprint now and print
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps({"measured_mib": measure()[0], "key": calibration.machine_key()}))
