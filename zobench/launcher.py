"""Run a suite: one fresh process per cell, a timeout each, failures recorded, records appended.

Why a fresh process (spawn, not fork): each cell's peak memory starts from a clean interpreter, and an
exception, an out-of-memory kill or a hang ends that cell only. The parent waits on the child's sentinel
and its message pipe with ``multiprocessing.connection.wait`` (no polling loop), and kills the child at
its timeout.

Children get ``MALLOC_MMAP_THRESHOLD_`` so that large freed blocks go back to the OS: otherwise glibc
keeps them in the heap and a later phase's peak RSS includes an earlier phase's garbage.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable

from zobench.matrix import Cell, expand, reference_key
from zobench.results import SCHEMA_VERSION, append_record, latest_by_cell, read_records
from zobench.suite import Suite, parse_selector, selector_matches

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "TOKENIZERS_PARALLELISM": "false"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _child(config: dict, conn) -> None:
    """Child process entry: run one cell and send ("record", rec) or ("error", reason, tail)."""
    try:
        from zobench.config import CellConfig
        from zobench.runner import run_cell

        cfg = CellConfig.from_dict(config, "cell")
        rec = run_cell(cfg, progress=lambda e: conn.send(("progress", e)))
        conn.send(("record", rec))
    except BaseException as e:  # everything is reported: the parent records the failure and goes on
        from zobench.errors import Unsupported, UserError

        tail = "" if isinstance(e, UserError) else "".join(traceback.format_exc().splitlines(True)[-15:])
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if isinstance(e, UserError):
            reason = str(e)
        try:
            conn.send(("unsupported" if isinstance(e, Unsupported) else "error", reason[:500], tail))
        except (OSError, ValueError):
            pass
    finally:
        conn.close()


def _convert(gguf: str) -> None:
    from zobench.models.load import converted_gguf_dir

    converted_gguf_dir(Path(gguf))


def prepare_models(cells: list[Cell]) -> None:
    """Convert GGUF models (the embedded default among them) once, before any cell runs.

    The first load of a GGUF file de-quantizes and converts it; done inside a measured cell, that cost
    and the modules it imports (about 70 MiB that stay resident) would land in the cell's peak, so the
    first cell on a new machine measured differently from every later one. It runs in a process of
    its own; a failure is left for the cell to report.
    """
    from zobench.models.load import pending_conversion

    specs = {s for c in cells for s in (c.config.model, c.config.model_fallback) if s}
    pending = {p for p in map(pending_conversion, sorted(specs)) if p is not None}
    for gguf in sorted(pending):
        print(f"zobench: converting {gguf.name} to safetensors once (kept in the cache)", file=sys.stderr,
              flush=True)
        proc = mp.get_context("spawn").Process(target=_convert, args=(str(gguf),), daemon=True)
        proc.start()
        proc.join()


@dataclass
class Outcome:
    status: str
    record: dict | None = None
    reason: str | None = None
    traceback_tail: str | None = None


def run_in_child(cell: Cell, timeout_s: float, on_progress: Callable[[dict], None]) -> Outcome:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    saved = {k: os.environ.get(k) for k in CHILD_ENV}
    os.environ.update(CHILD_ENV)  # spawn copies the parent's environment at start()
    try:
        proc = ctx.Process(target=_child, args=(cell.config.to_dict(), send), daemon=True)
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    send.close()
    deadline = time.monotonic() + timeout_s
    outcome: Outcome | None = None
    try:
        while outcome is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome = Outcome("timeout", reason=f"timed out after {timeout_s:.0f} s; killed")
                break
            ready = wait([recv, proc.sentinel], timeout=remaining)
            if recv in ready:
                try:
                    msg = recv.recv()
                except EOFError:  # child gone without a message: the sentinel tells how
                    proc.join(5)
                    outcome = _death(proc.exitcode)
                    break
                if msg[0] == "progress":
                    on_progress(msg[1])
                elif msg[0] == "record":
                    outcome = Outcome("ok", record=msg[1])
                elif msg[0] == "unsupported":
                    outcome = Outcome("unsupported", reason=msg[1])
                else:
                    outcome = Outcome("failed", reason=msg[1], traceback_tail=msg[2] or None)
            elif proc.sentinel in ready and not recv.poll():
                proc.join(5)
                outcome = _death(proc.exitcode)
    finally:
        if proc.is_alive():
            proc.join(10 if outcome and outcome.status != "timeout" else 0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
    return outcome


def _death(exitcode: int | None) -> Outcome:
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        hint = " (out of memory?)" if sig == 9 else ""
        return Outcome("failed", reason=f"killed by signal {sig}{hint}")
    return Outcome("failed", reason=f"child exited with code {exitcode} without a result")


def derive(record: dict, earlier: list[dict]) -> dict:
    """Ratios against the forward reference and the full-ZO cell sharing the model/dtype/quant/task."""
    from zobench.analysis.derive import train_peak_mib as peak

    def step_median(r):
        return (r.get("metrics", {}).get("step_s") or {}).get("median")

    out = {"peak_mib": peak(record)}
    key = reference_key(record["config"])
    same = [r for r in earlier if r.get("status") == "ok" and reference_key(r["config"]) == key]
    fwd = next((r for r in reversed(same) if r["config"]["method"] == "forward"), None)
    full = next((r for r in reversed(same) if r["config"]["method"] == "full"), None)
    step = step_median(record) if record["config"].get("method") != "forward" else None  # the reference
    # Prefer the cell's own reference forwards (same process, interleaved with its steps); the
    # suite's forward cell ran in another process and only stands in for records without them.
    in_cell = (record.get("metrics", {}).get("forward_ref_s") or {}).get("median")
    if step and in_cell:
        out["step_over_two_forwards"], out["forward_ref"] = step / (2 * in_cell), "in-cell"
    elif fwd and step and step_median(fwd):
        out["step_over_two_forwards"], out["forward_ref"] = step / (2 * step_median(fwd)), "forward cell"
    if fwd and out["peak_mib"] and peak(fwd):
        out["peak_over_inference"] = out["peak_mib"] / peak(fwd)
    if full and step and step_median(full):
        out["speedup_vs_full"] = step_median(full) / step
    return out


def make_record(suite: Suite, cell: Cell, outcome: Outcome, started: str, wall: float, env: dict,
                git: dict) -> dict:
    rec = outcome.record or {"config": cell.config.to_dict(), "metrics": {}, "phases": {}}
    rec.update(schema=SCHEMA_VERSION, suite=suite.name, suite_file=str(suite.path) if suite.path else None,
               cell_id=cell.cell_id, labels=cell.labels, status=outcome.status, started_at=started,
               finished_at=_now(), wall_s=wall, env=env, git=git)
    if outcome.status != "ok":
        rec["reason"] = outcome.reason
        rec["traceback_tail"] = outcome.traceback_tail
    from zobench.estimate import record_estimate

    # The predicted peak beside the measured one (reports show both); never raises: a failed estimate
    # is stored as {"error": ...} and the cell's record stands.
    rec["estimate"] = record_estimate(cell.config)
    return rec


def select_cells(suite: Suite, only: str | None = None) -> list[Cell]:
    cells = expand(suite)
    if only:
        sel = parse_selector(only, "--only")
        cells = [c for c in cells if selector_matches(sel, {**c.config.to_dict(), **c.labels})]
    return cells


def run_suite(suite: Suite, out_dir: Path, resume: bool = False, only: str | None = None,
              reporter=None) -> Path:
    """Run the suite's cells; returns the results path. ``reporter`` gets start/progress/done events."""
    from zobench.measure.env import environment, git_state

    out = Path(out_dir) / f"{suite.name}.jsonl"
    cells = select_cells(suite, only)
    existing = read_records(out) if out.exists() else []
    done = {r["cell_id"] for r in existing if r.get("status") == "ok"} if resume else set()
    todo = [c for c in cells if c.cell_id not in done]
    env, git = environment(), git_state(Path(suite.path).parent if suite.path else ".")
    env["malloc_mmap_threshold"] = CHILD_ENV["MALLOC_MMAP_THRESHOLD_"]
    reporter = reporter or (lambda *a: None)
    prepare_models(todo)
    if any(not str(c.config.device).startswith("cuda") for c in todo):
        from zobench.analysis.calibration import framework

        framework("cpu")  # measured once per machine, before the cells: their records carry estimates
    reporter("suite", {"total": len(cells), "todo": len(todo), "skipped": len(cells) - len(todo)})
    records = latest_by_cell(existing)
    for i, cell in enumerate(todo):
        reporter("cell", {"index": i, "cell": cell})
        started, t0 = _now(), time.monotonic()
        outcome = run_in_child(cell, cell.config.timeout_s or suite.timeout_s, lambda e: reporter("progress", e))
        rec = make_record(suite, cell, outcome, started, time.monotonic() - t0, env, git)
        if outcome.status == "ok":
            rec["derived"] = derive(rec, records)
        append_record(out, rec)
        records.append(rec)
        reporter("done", {"index": i, "cell": cell, "record": rec})
    return out
