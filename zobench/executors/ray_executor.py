"""``zobench run SUITE --executor ray [--address auto|ray://HOST:10001]``: cells as Ray tasks.

Without ``--address`` a private Ray instance starts on this machine (no dashboard, no usage statistics,
token authentication with a token made for the run and kept out of files, a capped object store) and
stops with the run; with it, zobench joins an existing
cluster, whose nodes need the same zobench and torch installed.

One cell = one Ray task that asks for what the cell needs: one GPU for a CUDA cell (Ray sets its
``CUDA_VISIBLE_DEVICES``, so cells running at once never share a GPU), CPUs (``--jobs N``: N CPU cells per
node, each with that node's CPUs divided by N; threads set explicitly, since Ray lowers OMP_NUM_THREADS),
and ``memory`` from the cell's estimate. The task runs the cell in a fresh child process that never imports
Ray (``zobench.executors.child``): peak memory and CUDA counters are per process, and a reused Ray worker
would carry the previous cell's heap and CUDA context. The task streams the child's progress back
(a streaming generator), and its last message is the record.

Failures: a cell's own failure (exception, crash, OOM kill, timeout) is a failed record, one attempt only.
A lost worker or node is Ray's to retry (``max_retries``, default 2); when the retries run out the cell is
recorded with status ``lost`` and ``--resume`` runs it again. Ray's own OOM-killer retries are off for the
private instance (``task_oom_retries=0``). The driver is the only writer of the results file and appends a
cell's record once.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from zobench.cell.record import CellRecord, Execution
from zobench.errors import UserError
from zobench.executors.base import Executor, OnEvent
from zobench.executors.local import CHILD_ENV, THREAD_VARS, death_reason, end_of, failed_record
from zobench.spec.matrix import Cell

OBJECT_STORE_MIB = 256  # the private instance's object store: records and sketch rows, never weights
MEMORY_MARGIN = 1.25    # a CPU cell asks Ray for its estimated peak times this


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None):
    """Ray, initialised: an existing connection is reused (tests start one per session); ``address`` joins a
    cluster; otherwise a private local instance. Returns ``(ray, started_here)``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'zobench[ray]' (scripts/setup.sh installs it)") \
            from None
    if ray.is_initialized():
        return ray, False
    common = dict(include_dashboard=False, log_to_driver=False, logging_level="warning")
    if address:
        reachable(address)
        with quiet_stderr() as said, own_sigterm():
            try:
                ray.init(address=address, **common)
            except Exception as e:  # ConnectionError, a bad address, a version mismatch: one line, exit 2
                first = (str(e).splitlines() or said() or [""])[0][:200]
                raise UserError(f"--address {address}: cannot join the Ray cluster ({type(e).__name__}: "
                                f"{first})") from None
        return ray, True
    # A private instance. Ray's ports listen on every interface even with the node address set to
    # 127.0.0.1, so token authentication stays on; the token is made here, for this run only, and lives in
    # this process tree's environment (cells never see it), not in a file under the user's home.
    # (Ray turns token mode on for a new local instance itself; it only needs a token it finds.)
    wants_token = os.environ.get("RAY_AUTH_MODE", "token") == "token"
    if wants_token and not ({"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ)):
        import secrets

        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Workers (and the cells they start) import this same zobench, wherever it was imported from here.
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    with own_sigterm():
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=OBJECT_STORE_MIB * 2**20,
                 _node_ip_address="127.0.0.1", _system_config={"task_oom_retries": 0}, **common)
    return ray, True


CONNECT_TIMEOUT_S = 10.0


@contextlib.contextmanager
def quiet_stderr():
    """Hold what Ray's C++ core writes to the process's stderr while joining a cluster (a failed join logs
    20 lines of gRPC retries there, past Python's sys.stderr); it is shown only if the join succeeds and
    there was something worth keeping, and a failure is then reported in one line. Yields a function that
    returns the lines held so far."""
    held = tempfile.TemporaryFile()
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(held.fileno(), 2)
    lines = []

    def said() -> list[str]:
        held.seek(0)
        lines[:] = held.read().decode("utf-8", "replace").splitlines()
        return lines

    try:
        yield said
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        held.close()


@contextlib.contextmanager
def own_sigterm():
    """Ray's init installs a SIGTERM handler that exits with code 15; zobench's (stop like Ctrl-C: exit
    130, running cells killed) is put back, and a SIGTERM during the join itself counts as an interrupt."""
    mine = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as e:
        if e.code == signal.SIGTERM:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGTERM, mine)


def reachable(address: str) -> None:
    """Refuse in one line, within ``CONNECT_TIMEOUT_S``, a cluster address nobody answers at (Ray's own
    connect retries for minutes and cannot be interrupted meanwhile). ``auto`` and names without a port
    are left to Ray, which answers those at once."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"--address {address}: nothing answers there ({e.strerror or type(e).__name__}, "
                        f"waited up to {CONNECT_TIMEOUT_S:.0f} s); is the Ray cluster running?") from None


def nodes(ray) -> list[dict]:
    """The alive nodes' resources: [{"id", "cpus", "gpus", "memory"}]."""
    out = []
    for n in ray.nodes():
        if n.get("Alive"):
            r = n.get("Resources", {})
            out.append({"id": n["NodeID"], "cpus": int(r.get("CPU", 0)), "gpus": int(r.get("GPU", 0)),
                        "memory": int(r.get("memory", 0))})
    if not out:
        raise UserError("the Ray cluster has no alive node")
    return out


def cell_task(config: dict, timeout_s: float, threads: int, cpu_only: bool):
    """The Ray task (a streaming generator): run one cell in a fresh child process, yield its messages.

    Yields {"kind": "start", ...}, {"kind": "progress", "event"}..., then {"kind": "end", "record" | "status",
    "reason", "tail", "execution"}. Everything the cell does wrong comes back as an "end" message; only a
    dying worker or node makes the task itself fail (and Ray retry it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(CHILD_ENV, **{v: str(threads) for v in THREAD_VARS}, ZOBENCH_PARENT_PID=str(os.getpid()))
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
            if not select.select([read_fd], [], [], left)[0]:
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


LOST = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "OwnerDiedError", "ObjectLostError",
        "ObjectReconstructionFailedError")


@dataclass
class _Running:
    cell: Cell
    node: str | None = None             # set by the task's first "start" message
    peers: int = 1
    where: dict = field(default_factory=dict)


class RayExecutor(Executor):
    """Cells as Ray tasks on a private local instance or an existing cluster."""

    name = "ray"

    def __init__(self, on_event: OnEvent | None = None, jobs: int = 1, address: str | None = None,
                 max_retries: int = 2):
        super().__init__(on_event)
        self.jobs, self.address, self.max_retries = max(1, int(jobs)), address, int(max_retries)
        self.ray, self.started_here = connect(address)
        self.nodes = nodes(self.ray)
        self.queue: list[tuple[Cell, float]] = []
        self.pending: dict = {}

    def submit(self, cell: Cell, timeout_s: float) -> None:
        self.queue.append((cell, timeout_s))

    def resources(self, cell: Cell) -> dict:
        """What the cell's task asks Ray for: num_cpus, num_gpus, memory (bytes)."""
        cpus = min(n["cpus"] for n in self.nodes if n["cpus"] > 0) if any(n["cpus"] for n in self.nodes) else 1
        gpu_nodes = [n for n in self.nodes if n["gpus"] > 0]
        device = str(cell.config.device)
        if device.startswith("cuda") or (device == "auto" and gpu_nodes):
            if not gpu_nodes:
                raise UserError(f"cell {cell.cell_id} asks for device {device!r}; the Ray cluster has no GPU")
            per_gpu = min(max(1, n["cpus"] // n["gpus"]) for n in gpu_nodes)
            return {"num_cpus": per_gpu, "num_gpus": 1}
        out = {"num_cpus": max(1, cpus // self.jobs), "num_gpus": 0}
        from zobench.analysis.estimate import record_estimate

        est = record_estimate(cell.config).get("peak_mib")
        if est:  # never more than the largest node has: an over-estimate must not leave a cell unschedulable
            out["memory"] = int(min(est * MEMORY_MARGIN * 2**20, max(n["memory"] for n in self.nodes)))
        return out

    def finished(self) -> Iterator[tuple[Cell, CellRecord]]:
        ray = self.ray
        task = ray.remote(cell_task)
        for cell, timeout_s in self.queue:
            res = self.resources(cell)
            ref = task.options(num_returns="streaming", max_retries=self.max_retries, retry_exceptions=False,
                               name=f"zobench-cell-{cell.cell_id}", **res).remote(
                cell.config.to_dict(), timeout_s, res["num_cpus"], res["num_gpus"] == 0)
            self.pending[ref] = _Running(cell)
        self.queue.clear()
        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1)
            for ref in ready:
                run = self.pending[ref]
                rec = self._next(ref, run)
                if rec is None:
                    continue
                del self.pending[ref]
                yield run.cell, rec

    def _next(self, ref, run: _Running) -> CellRecord | None:
        """Take the task's next message; the cell's record once it is over."""
        try:
            msg = self.ray.get(next(ref))
        except StopIteration:
            return self._done(run, failed_record(run.cell, "failed", "the Ray task ended without a record"))
        except self.ray.exceptions.RayError as e:
            kind = type(e).__name__
            lost = any(k in kind or k in str(type(getattr(e, "cause", None))) for k in LOST)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            if lost:
                return self._done(run, failed_record(
                    run.cell, "lost", f"the Ray worker or node running the cell died ({kind}) and "
                                      f"{self.max_retries} retries ran out; --resume runs it again"))
            return self._done(run, failed_record(run.cell, "failed", f"Ray: {kind}: {first}"))
        if msg["kind"] == "start":
            if run.node is None:
                run.node, run.where = msg["node"], msg
                self._count(run)
                self.on_event("start", {"cell": run.cell, "where": msg})
            return None
        if msg["kind"] == "progress":
            self.on_event("progress", dict(msg["event"], cell=run.cell))
            return None
        rec = (CellRecord.from_json(msg["record"]) if "record" in msg
               else failed_record(run.cell, msg["status"], msg["reason"], msg.get("tail")))
        run.where, run.node = msg["execution"], msg["execution"]["node"]  # a retry may have run it elsewhere
        return self._done(run, rec)

    def _count(self, run: _Running) -> None:
        same = [r for r in self.pending.values() if r.node == run.node]
        for r in same:
            r.peers = max(r.peers, len(same))

    def _done(self, run: _Running, rec: CellRecord) -> CellRecord:
        w = run.where
        rec.execution = Execution(executor=self.name, node=w.get("node"), gpu=w.get("gpu"),
                                  concurrent_cells=run.peers, threads=w.get("threads"),
                                  worker_pid=w.get("worker_pid"), ray_imported=w.get("ray_imported"),
                                  span_s=w.get("span_s"))
        return rec

    def close(self) -> None:
        for ref in list(self.pending):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # already finished or gone
                pass
        self.pending.clear()
        self.queue.clear()
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()
            self.started_here = False
