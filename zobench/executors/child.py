"""``python -m zobench.executors.child``: run one cell in this process, for executors whose own process must
not be its parent's copy.

The Ray executor starts cells with this module instead of ``multiprocessing`` spawn: spawn re-imports the
parent's ``__main__``, which in a Ray worker imports Ray (about 50 MiB more baseline memory, a different
heap, threads), and every measured peak would carry it. This module imports only zobench and what the cell
needs; it reports whether Ray got imported anyway, so a record can prove its process was clean.

Protocol: the cell config arrives as JSON on stdin ({"config": ..., "threads": N}); messages go out as JSON
lines on the file descriptor named by ``ZOBENCH_MSG_FD`` (stdout and stderr stay the cell's own output):
("progress", event) ..., then ("record", json) or ("error" | "unsupported", reason, tail), then
("process", {"pid", "ray_imported", "span_s"}). The process kills itself when its parent dies
(``PR_SET_PDEATHSIG``), so a lost Ray worker never leaves an orphan cell running beside its retry.
"""

from __future__ import annotations

import json
import os
import sys
import time

from zobench.procs import die_with_parent


def main() -> None:
    start = time.time()
    die_with_parent(int(os.environ.pop("ZOBENCH_PARENT_PID", os.getppid())))
    out = os.fdopen(int(os.environ.pop("ZOBENCH_MSG_FD")), "w", buffering=1)

    def send(msg) -> None:
        out.write(json.dumps(msg, default=str) + "\n")

    job = json.loads(sys.stdin.read())
    from zobench.executors.local import run_one

    run_one(job["config"], send, job.get("threads"))
    send(("process", {"pid": os.getpid(), "ray_imported": "ray" in sys.modules, "span_s": [start, time.time()]}))
    out.close()


if __name__ == "__main__":
    main()
