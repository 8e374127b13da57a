"""How zobench starts the processes that measure: the environment a cell's process gets, and that no process
zobench starts outlives the process that started it.

A cell, a cache worker or a model conversion killed with its parent (``kill -9`` of ``zobench run``, a
scheduler's stop, a lost Ray worker) must not run on and keep writing: the kernel kills it when its
parent dies (Linux ``PR_SET_PDEATHSIG``).

How a cell's process allocates host memory is its ``malloc`` setting (``child_env``: set in the environment the
process starts with). "release" (the default, ``MALLOC_MMAP_THRESHOLD_=131072``) makes every freed block over
128 KiB go back to the OS at once: a phase's peak RSS is then live memory, the same from run to run, and not
what glibc's heap kept of earlier work; but the blocks each forward allocates come back as fresh pages, which
costs page faults a user's process does not pay: SmolLM2's quantized forwards ran 1.5-4x slower and their step /
2 fwd ratios read towards 1 (float ones moved by 0.03 at most) (results/bench/measurements.md, "The allocator a
cell runs under"). "glibc" leaves malloc as a user's process has it: honest timings, peaks that include what the
heap kept (about 10% from run to run), and zobench adds nothing: what the user's own environment carries passes
through, is recorded (``malloc_env``) and keys the estimator's calibration (``analysis.calibration``). On a GPU
cells get expandable segments for torch's CUDA allocator (``child_env``): segments that grow in place leave no
fragments to the next phase.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false"}
# glibc's malloc reads these from the environment at process start (mallopt(3), "Environment variables").
MALLOC_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
               "MALLOC_TRIM_THRESHOLD_", "MALLOC_PERTURB_", "MALLOC_CHECK_", "GLIBC_TUNABLES")
# The CUDA caching allocator's counterpart: segments that grow in place instead of new fixed-size blocks, so
# a phase's device peak is what it holds, not the fragments earlier phases left (bench/mask_memory.py on an
# H200, the mask phase's stages, reserved MiB without / with: backward 2,500 / 2,444, top-k 3,350 / 2,842,
# for 2,391 and 2,707 allocated; seconds the same). A user's own PYTORCH_CUDA_ALLOC_CONF wins.
CUDA_ALLOC_CONF = "expandable_segments:True"
# Set to a cell's thread count before torch loads in its process (executors that divide the cores).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# What a cell's ``malloc: release`` puts in its process's environment (glibc reads it at start).
RELEASE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def child_env(malloc: object = "release") -> dict[str, str]:
    """What a cell's process gets on top of the parent's environment, for the cell's ``malloc`` setting."""
    env = {**CHILD_ENV, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)}
    return {**env, **RELEASE_ENV} if malloc == "release" else env


def malloc_in_effect() -> str:
    """The ``malloc`` setting this process runs under (what a run inside it, not in a cell's own process, is)."""
    return "release" if all(os.environ.get(k) == v for k, v in RELEASE_ENV.items()) else "glibc"


def malloc_env() -> dict[str, str]:
    """The malloc settings a cell's process inherits from this one's environment (empty: glibc's defaults)."""
    return {k: os.environ[k] for k in MALLOC_VARS if k in os.environ}


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` (the process that started it) dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent kills its children on timeout only
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
