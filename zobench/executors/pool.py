"""``zobench run SUITE --jobs N``: N cells at once on this machine, each in its own fresh process.

On a CPU machine the cores are divided: each cell runs with cpu_count // N torch threads (and the
OpenMP/MKL variables set to match before torch loads). On a GPU machine each cell that uses CUDA gets a
GPU of its own through CUDA_VISIBLE_DEVICES and waits while none is free; cells on the CPU see no GPU.
Concurrency skews latency (shared memory bandwidth, caches, turbo clocks), so every record says how many
cells ran at once beside its timings (``execution.concurrent_cells``).
"""

from __future__ import annotations

import os

import torch

from zobench.executors.local import CellProcess, LocalExecutor
from zobench.procs import THREAD_VARS
from zobench.spec.matrix import Cell


def visible_gpus() -> list[str]:
    """GPU indices this process may hand out (its own CUDA_VISIBLE_DEVICES, else every device)."""
    own = os.environ.get("CUDA_VISIBLE_DEVICES")
    if own is not None:
        return [g.strip() for g in own.split(",") if g.strip()]
    try:
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


class PoolExecutor(LocalExecutor):
    name = "pool"

    def __init__(self, on_event=None, jobs: int = 2, gpus: list[str] | None = None, cpus: int | None = None,
                 memory_check: bool = True):
        super().__init__(on_event, jobs, memory_check)
        self.gpus = visible_gpus() if gpus is None else list(gpus)
        self.free_gpus = list(self.gpus)
        self.threads = max(1, (cpus or os.cpu_count() or 1) // self.jobs)

    def placement(self, cell: Cell):
        if len(self.running) >= self.jobs:
            return None
        env = {v: str(self.threads) for v in THREAD_VARS}
        wants_gpu = str(cell.config.device).startswith("cuda") or (cell.config.device == "auto" and self.gpus)
        if wants_gpu:
            if not self.free_gpus:
                return None if self.gpus else (dict(env, CUDA_VISIBLE_DEVICES=""), self.threads)
            env["CUDA_VISIBLE_DEVICES"] = self.free_gpus.pop(0)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU cell on a GPU node sees no GPU
        return env, self.threads

    def release(self, proc: CellProcess) -> None:
        if proc.gpu and proc.gpu in self.gpus:
            self.free_gpus.append(proc.gpu)
