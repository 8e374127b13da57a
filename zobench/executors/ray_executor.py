"""``zobench run SUITE --executor ray [--address auto|ray://HOST:10001]``: cells as Ray tasks.

Without ``--address`` a private Ray instance starts on this machine (no dashboard, no usage statistics,
token authentication with a token made for the run and kept out of files, a capped object store) and
stops with the run; with it, zobench joins an existing
cluster, whose nodes need the same zobench and torch installed.

One cell = one Ray task that asks for what the cell needs: one GPU for a CUDA cell (Ray sets its
``CUDA_VISIBLE_DEVICES``, so cells running at once never share a GPU), CPUs (``--jobs N``: N CPU cells per
node, each with that node's CPUs divided by N; threads set explicitly, since Ray lowers OMP_NUM_THREADS),
and ``memory`` from the cell's estimate. The task (``executors.ray_task``) runs the cell in a fresh child
process that never imports Ray (``zobench.executors.child``): peak memory and CUDA counters are per process,
and a reused Ray worker would carry the previous cell's heap and CUDA context. The task streams the child's
progress back (a streaming generator), and its last message is the record.

Failures: a cell's own failure (exception, crash, OOM kill, timeout) is a failed record, one attempt only.
A lost worker or node is Ray's to retry (``max_retries``, default 2); when the retries run out the cell is
recorded with status ``lost`` and ``--resume`` runs it again. Ray's own OOM-killer retries are off for the
private instance (``task_oom_retries=0``). The driver is the only writer of the results file and appends a
cell's record once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

from zobench.analysis.estimate import record_estimate
from zobench.cell.measures import Execution
from zobench.cell.record import CellRecord
from zobench.errors import UserError
from zobench.executors.base import Executor, OnEvent
from zobench.executors.local import failed_record
from zobench.executors.ray_task import cell_task
from zobench.gates.ray import connect, nodes
from zobench.spec.matrix import Cell

MEMORY_MARGIN = 1.25    # a CPU cell asks Ray for its estimated peak times this


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
                cell.config.to_dict(), timeout_s, res["num_cpus"], res["num_gpus"] == 0,
                # on a private instance the task runs on this machine and can watch this process
                os.getpid() if self.started_here else None)
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
