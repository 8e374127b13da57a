"""Cells in fresh processes on this machine: one at a time (``LocalExecutor``), or several (``pool``).

Why a fresh process (spawn, not fork): each cell's peak memory starts from a clean interpreter, and an
exception, an out-of-memory kill or a hang ends that cell only. The parent waits on the children's
sentinels and message pipes with ``multiprocessing.connection.wait`` (no polling loop) and kills a child
at its timeout.

Children get ``procs.child_env()`` (on a GPU, expandable segments for torch's CUDA allocator, so a later
phase's peak does not include an earlier phase's fragments; the cell's ``malloc`` setting). What
runs in a child is ``executors.child``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Iterator

import psutil

from zobench.analysis.fits import host_need_mib, memory_refusal
from zobench.cell.measures import Execution
from zobench.cell.record import CellRecord
from zobench.executors.base import Executor, OnEvent
from zobench.executors.child import death_reason, end_of, spawned
from zobench.measure.machine import available_memory_mib
from zobench.procs import child_env
from zobench.spec.matrix import Cell

WAIT = "wait"  # LocalExecutor._memory: the cell fits once a running cell ends


def failed_record(cell: Cell, status: str, reason: str, tail: str | None = None) -> CellRecord:
    """The record of a cell that produced none itself (failed, timed out, killed, lost)."""
    return CellRecord(cell_id=cell.cell_id, status=status, config=cell.config.to_dict(), reason=reason,
                      traceback_tail=tail)


class CellProcess:
    """One cell in a spawned child, watched by the parent until it sends a record, dies or times out."""

    def __init__(self, cell: Cell, timeout_s: float, env: dict[str, str], threads: int | None, on_event: OnEvent):
        self.cell, self.timeout_s, self.on_event = cell, timeout_s, on_event
        self.threads, self.gpu = threads, env.get("CUDA_VISIBLE_DEVICES")
        ctx = mp.get_context("spawn")
        self.recv, send = ctx.Pipe(duplex=False)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # spawn copies the parent's environment at start()
        try:
            self.proc = ctx.Process(target=spawned, args=(cell.config.to_dict(), send, threads, os.getpid()),
                                    daemon=True)
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        send.close()
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.peers = 1  # the most cells running at once while this one ran, itself included

    @property
    def handles(self) -> list:
        return [self.recv, self.proc.sentinel]

    def rss_mib(self) -> float | None:
        """The child's resident memory now, or None once it is gone."""
        try:
            return psutil.Process(self.proc.pid).memory_info().rss / 2**20
        except (psutil.Error, ValueError, TypeError):
            return None

    def poll(self) -> CellRecord | None:
        """Read what the child sent (or how it died); a record once the cell is over, else None."""
        if time.monotonic() >= self.deadline:
            self.kill()
            return self._failed("timeout", f"timed out after {self.timeout_s:.0f} s; killed")
        while self.recv.poll():
            try:
                msg = self.recv.recv()
            except EOFError:  # gone without a message: the exit code tells how
                return self._death()
            if msg[0] == "progress":
                self.on_event("progress", dict(msg[1], cell=self.cell))
            elif (end := end_of(msg)) is not None:
                self._reap()
                if "record" in end:
                    return CellRecord.from_json(end["record"])
                return self._failed(end["status"], end["reason"], end["tail"])
        if not self.proc.is_alive():
            return self._death()
        return None

    def _death(self) -> CellRecord:
        self.proc.join(5)
        return self._failed("failed", death_reason(self.proc.exitcode))

    def _failed(self, status: str, reason: str, tail: str | None = None) -> CellRecord:
        return failed_record(self.cell, status, reason, tail)

    def _reap(self) -> None:
        self.proc.join(10)
        if self.proc.is_alive():
            self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.recv.close()

    def execution(self, executor: str) -> Execution:
        return Execution(executor=executor, node=socket.gethostname(), gpu=self.gpu, concurrent_cells=self.peers,
                         threads=self.threads)


class LocalExecutor(Executor):
    """Cells one after another, each in a fresh process with all of this machine's threads. A cell whose
    estimated peak does not fit in the memory available when its turn comes is recorded as unsupported,
    with both figures, instead of started; with cells side by side (``jobs``), one that fits only once a
    running cell ends waits for it (``memory_check``, ``_memory``)."""

    name = "local"

    def __init__(self, on_event: OnEvent | None = None, jobs: int = 1, memory_check: bool = True):
        super().__init__(on_event)
        self.jobs = max(1, int(jobs))
        self.memory_check = memory_check
        self.queue: deque[tuple[Cell, float]] = deque()
        self.running: list[CellProcess] = []
        self.refused: deque[tuple[Cell, CellRecord]] = deque()  # records of cells not started (memory)
        self.needs: dict[str, float | None] = {}  # host_need_mib per cell id, estimated once

    def submit(self, cell: Cell, timeout_s: float) -> None:
        self.queue.append((cell, timeout_s))

    def placement(self, cell: Cell) -> tuple[dict, int | None] | None:
        """(environment, torch threads) for ``cell`` now, or None when it must wait for a free slot."""
        return ({}, None) if len(self.running) < self.jobs else None

    def release(self, proc: CellProcess) -> None:
        """A finished cell's slot is free again."""

    def finished(self) -> Iterator[tuple[Cell, CellRecord]]:
        while self.queue or self.running or self.refused:
            self._start_what_fits()
            while self.refused:
                yield self.refused.popleft()
            if not self.running:
                continue
            ready = wait([h for p in self.running for h in p.handles],
                         timeout=max(0.0, min(p.deadline for p in self.running) - time.monotonic()))
            for proc in [p for p in self.running if any(h in ready for h in p.handles)
                         or time.monotonic() >= p.deadline]:
                rec = proc.poll()
                if rec is None:
                    continue
                self.running.remove(proc)
                self.release(proc)
                rec.execution = proc.execution(self.name)
                yield proc.cell, rec

    def _need(self, cell: Cell) -> float | None:
        if cell.cell_id not in self.needs:
            self.needs[cell.cell_id] = host_need_mib(cell.config)
        return self.needs[cell.cell_id]

    def _memory(self, cell: Cell) -> str | None:
        """None when ``cell`` may start now; WAIT when it fits only once running cells end; else why it is
        not started (``memory_refusal``). Running cells keep room for what their estimates say they have yet
        to take (estimated peak less their RSS now), so cells side by side (``--jobs``) do not together
        outgrow the machine."""
        need, available = self._need(cell), available_memory_mib()
        if need is None or available is None:
            return None
        growth = sum(max(0.0, (self._need(p.cell) or 0.0) - (p.rss_mib() or 0.0)) for p in self.running)
        if need <= available[0] - growth:
            return None
        return WAIT if self.running else memory_refusal(need, available)

    def _start_what_fits(self) -> None:
        waiting = deque()
        while self.queue:
            cell, timeout_s = self.queue.popleft()
            why = self._memory(cell) if len(self.running) < self.jobs and self.memory_check else None
            if why == WAIT:
                waiting.append((cell, timeout_s))
                continue
            if why:
                rec = failed_record(cell, "unsupported", why)
                rec.execution = Execution(executor=self.name, node=socket.gethostname())
                self.refused.append((cell, rec))
                continue
            placed = self.placement(cell)
            if placed is None:
                waiting.append((cell, timeout_s))
                continue
            env, threads = placed
            self.on_event("start", {"cell": cell})
            env = {**child_env(cell.config.malloc), **env}
            self.running.append(CellProcess(cell, timeout_s, env, threads, self.on_event))
            for p in self.running:
                p.peers = max(p.peers, len(self.running))
        self.queue = waiting
        if not self.running and self.queue and not self.refused:
            raise RuntimeError("no slot can ever take the queued cells")  # a placement bug, not user input

    def close(self) -> None:
        for proc in self.running:
            proc.kill()
        self.running.clear()
        self.queue.clear()
        self.refused.clear()
