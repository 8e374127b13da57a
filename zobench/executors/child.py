"""A cell's own process: what runs in it, and the messages its parent reads.

Every executor runs a cell in a fresh process of its own: ``spawned`` is the target of the local and pool
executors' ``multiprocessing`` spawn; ``python -m zobench.executors.child`` is started by the Ray executor's
task, whose own process must not be the cell's parent copy (spawn re-imports the parent's ``__main__``,
which in a Ray worker imports Ray: about 50 MiB more baseline memory, a different heap, threads, and every
measured peak would carry it). This module imports only zobench and what the cell needs; it reports
whether Ray got imported anyway, so a record can prove its process was clean.

The gate of the cell's process (habit 12's one exception besides ``zobench.gates``): its top imports are
light, and ``run_one`` imports torch and the cell's pipeline inside, in this order, because that order is
what makes the measurement clean: the process is tied to its parent first (``die_with_parent``), torch's
threads are set before anything runs, and the optional packages the cell will not use are hidden
(``quant.hide_others``) before peft or transformers' modeling code can import them.

Protocol (``-m``): the cell config arrives as JSON on stdin ({"config": ..., "threads": N}); messages go out as
JSON lines on the file descriptor named by ``ZOBENCH_MSG_FD`` (stdout and stderr stay the cell's own
output): ("progress", event) ..., then ("record", json) or ("error" | "unsupported", reason, tail), then
("process", {"pid", "ray_imported", "span_s"}). The process kills itself when its parent dies
(``PR_SET_PDEATHSIG``), so a lost Ray worker never leaves an orphan cell running beside its retry.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from zobench.errors import Unsupported, UserError
from zobench.procs import die_with_parent
from zobench.spec.config import CellConfig


def run_one(config: dict, send, threads: int | None) -> None:
    """Run one cell in this (fresh) process; ``send`` gets ("progress", event) messages, then ("record",
    json), or ("error" | "unsupported", reason, traceback tail). Shared by every executor's child."""
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        from zobench import quant

        cfg = CellConfig.from_dict(config, "cell")
        quant.hide_others(cfg.quant)  # before peft or transformers' modeling code is imported
        from zobench.cell.pipeline import run_cell

        rec = run_cell(cfg, progress=lambda e: send(("progress", e)))
        send(("record", rec.to_json()))
    except BaseException as e:  # everything is reported: the parent records the failure and goes on
        tail = "" if isinstance(e, UserError) else "".join(traceback.format_exc().splitlines(True)[-15:])
        reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        try:
            send(("unsupported" if isinstance(e, Unsupported) else "error", reason[:500], tail))
        except (OSError, ValueError):
            pass


def spawned(config: dict, conn, threads: int | None, parent: int | None = None) -> None:
    """Child process entry (spawn): run one cell and send its messages down ``conn``. The cell dies with
    ``parent`` (a ``zobench run`` killed outright leaves no cell running on)."""
    if parent is not None:
        die_with_parent(parent)
    try:
        run_one(config, conn.send, threads)
    finally:
        conn.close()


def end_of(msg) -> dict | None:
    """What a child's message (``run_one``'s protocol) ends its cell with: ``{"record": json}`` or
    ``{"status": "failed" | "unsupported", "reason", "tail"}``; None for one that does not end it."""
    if msg[0] == "record":
        return {"record": msg[1]}
    if msg[0] in ("error", "unsupported"):
        return {"status": "unsupported" if msg[0] == "unsupported" else "failed", "reason": msg[1],
                "tail": msg[2] or None}
    return None


def death_reason(code: int | None) -> str:
    """Why a child that sent no record is gone, from its exit code."""
    if code is not None and code < 0:
        return f"killed by signal {-code}" + (" (out of memory?)" if -code == 9 else "")
    return f"child exited with code {code} without a result"


def main() -> None:
    start = time.time()
    die_with_parent(int(os.environ.pop("ZOBENCH_PARENT_PID", os.getppid())))
    out = os.fdopen(int(os.environ.pop("ZOBENCH_MSG_FD")), "w", buffering=1)

    def send(msg) -> None:
        out.write(json.dumps(msg, default=str) + "\n")

    job = json.loads(sys.stdin.read())
    run_one(job["config"], send, job.get("threads"))
    send(("process", {"pid": os.getpid(), "ray_imported": "ray" in sys.modules, "span_s": [start, time.time()]}))
    out.close()


if __name__ == "__main__":
    main()
