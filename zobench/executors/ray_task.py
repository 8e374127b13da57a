"""The Ray task of a cell (``executors.ray_executor``): run it in a fresh child process, stream its messages.

Its own module, importing nothing heavy: a Ray worker imports the module a task is defined in, and the
worker only starts the cell's process (``python -m zobench.executors.child``) and relays what it says.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time

from zobench.executors.child import death_reason, end_of
from zobench.procs import THREAD_VARS, child_env


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def cell_task(config: dict, timeout_s: float, threads: int, cpu_only: bool, driver_pid: int | None = None):
    """The Ray task (a streaming generator): run one cell in a fresh child process, yield its messages.

    Yields {"kind": "start", ...}, {"kind": "progress", "event"}..., then {"kind": "end", "record" | "status",
    "reason", "tail", "execution"}. Everything the cell does wrong comes back as an "end" message; only a
    dying worker or node makes the task itself fail (and Ray retry it). With ``driver_pid`` (a private Ray
    instance: the driver is on this machine) the task checks every second that the driver lives, and ends
    the cell and its own worker when it does not: a driver killed outright leaves no cell running, whatever
    Ray's daemons take to notice."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(child_env(config.get("malloc", "release")), **{v: str(threads) for v in THREAD_VARS},
               ZOBENCH_PARENT_PID=str(os.getpid()))
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU cell on a GPU node sees no GPU
    gpu = env.get("CUDA_VISIBLE_DEVICES")
    where = {"node": socket.gethostname(), "gpu": gpu, "threads": threads, "worker_pid": os.getpid()}
    yield {"kind": "start", **where}
    read_fd, write_fd = os.pipe()
    env["ZOBENCH_MSG_FD"] = str(write_fd)
    proc = subprocess.Popen([sys.executable, "-m", "zobench.executors.child"], stdin=subprocess.PIPE, env=env,
                            pass_fds=(write_fd,))
    os.close(write_fd)
    proc.stdin.write(json.dumps({"config": config, "threads": threads}).encode())
    proc.stdin.close()
    deadline, buf, end, process = time.monotonic() + timeout_s, b"", None, {}
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                end = {"status": "timeout", "reason": f"timed out after {timeout_s:.0f} s; killed"}
                break
            if not select.select([read_fd], [], [], min(left, 1.0))[0]:
                if driver_pid is not None and not alive(driver_pid):
                    proc.kill()
                    proc.wait()
                    os._exit(1)  # the worker too: nobody will read what it yields
                continue
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if msg[0] == "progress":
                    yield {"kind": "progress", "event": msg[1]}
                elif msg[0] == "process":
                    process = msg[1]
                else:
                    end = end_of(msg) or end
    finally:
        os.close(read_fd)
        code = proc.wait()
    if end is None:
        end = {"status": "failed", "reason": death_reason(code)}
    execution = dict(where, ray_imported=process.get("ray_imported"), span_s=process.get("span_s"))
    yield {"kind": "end", **end, "execution": execution}
