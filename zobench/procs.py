"""How zobench starts the processes that measure: the environment a cell's process gets, and that no process
zobench starts outlives the process that started it.

A cell, a cache worker or a model conversion killed with its parent (``kill -9`` of ``zobench run``, a
scheduler's stop, a lost Ray worker) must not run on and keep writing: the kernel kills it when its
parent dies (Linux ``PR_SET_PDEATHSIG``).

Cells get ``MALLOC_MMAP_THRESHOLD_`` so that large freed blocks go back to the OS: otherwise glibc keeps
them in the heap and a later phase's peak RSS includes an earlier phase's garbage. It is part of what the
estimator's calibration is keyed on (``analysis.calibration``), so it lives here, in the ground. On a GPU
they also get expandable segments for torch's CUDA allocator (``child_env``), for the same reason.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "TOKENIZERS_PARALLELISM": "false"}
# The CUDA caching allocator's counterpart: segments that grow in place instead of new fixed-size blocks, so
# a phase's device peak is what it holds, not the fragments earlier phases left (bench/mask_memory.py on an
# H200, the mask phase's stages, reserved MiB without / with: backward 2,500 / 2,444, top-k 3,350 / 2,842,
# for 2,391 and 2,707 allocated; seconds the same). A user's own PYTORCH_CUDA_ALLOC_CONF wins.
CUDA_ALLOC_CONF = "expandable_segments:True"
# Set to a cell's thread count before torch loads in its process (executors that divide the cores).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def child_env() -> dict[str, str]:
    """What a cell's process gets on top of the parent's environment."""
    return {**CHILD_ENV, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)}


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` (the process that started it) dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent kills its children on timeout only
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
