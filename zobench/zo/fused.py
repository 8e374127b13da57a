"""The fused passes of a ZO step: one pass over the weights per call, in place, no z temporary.

z is the counter-based Philox direction of zo/kernels/zo_pass.c (its header defines it): the value at
global index i of the trainable set depends only on the step's seed and i. Two implementations give the
same numbers: the C library (OpenMP, called through ctypes on the tensors' data) for contiguous CPU
tensors, and zo/philox.py (torch ops) everywhere else, or when the library cannot be built. ``path()``
says which one this process runs, ``fallback_reason()`` why not the C one.

The two agree bit for bit: z of either direction (Gaussian z is Box-Muller on log, sin and cos written out
with IEEE-exact operations, not libm's: zo_pass.c's header), and the passes built on it (tests/test_fused.py;
bench/zo_kernel.py compares 10^7 Gaussian values). One assumption: a Gaussian term is a fused multiply-add in
C, and torch's add(x, z, alpha=c) is one too on AVX2/AVX-512 CPUs and under nvcc; a torch build without FMA
would round twice, and differ by a float32 ulp in a rare value.

The C library's OpenMP team takes ``torch.get_num_threads()`` threads, so a cell's thread setting holds
for the perturbation passes as it does for the forwards. ``ZOBENCH_ZO_KERNEL=torch`` forces the fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from typing import Sequence

import torch

from zobench.zo import philox
from zobench.zo.kernels.build import BuildError, load

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DIRECTIONS = {"rademacher": 0, "gaussian": 1}
C_PATH, TORCH_PATH = "c-openmp", "torch"

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, "reason": why None
# What the passes of this process did: calls per path, bytes read and written, seconds (``pass_stats``).
_passes: dict = {"calls": {}, "bytes": 0, "seconds": 0.0}
_forced = [False]  # torch_fallback() in force


def _library():
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["reason"] = None, None
            if os.environ.get("ZOBENCH_ZO_KERNEL") == TORCH_PATH:
                _state["reason"] = "ZOBENCH_ZO_KERNEL=torch"
            else:
                try:
                    _state["lib"] = bind(load())
                except BuildError as e:
                    _state["reason"] = str(e)
        return _state["lib"]


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with its functions' argument types set (ctypes would otherwise pass 64-bit ints as 32)."""
    i32, i64, f32, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.zo_pass.argtypes = [i32, i32, i64, i64, ptr, ptr, ptr, ptr, ptr, i32, i32, i32, f32, i32]
    lib.zo_pass.restype = None
    lib.zo_philox.argtypes = [ptr, ptr, ptr]
    lib.zo_philox.restype = None
    return lib


def path() -> str:
    """Which implementation runs the passes of CPU tensors here: ``c-openmp`` or ``torch``."""
    return C_PATH if _library() is not None else TORCH_PATH


def fallback_reason() -> str | None:
    """Why the torch fallback runs (None when the C library does): a line for a record."""
    _library()
    return _state["reason"]


@contextlib.contextmanager
def torch_fallback():
    """Within the block every pass runs the torch fallback, as where no compiler is (for comparisons)."""
    saved = _forced[0]
    _forced[0] = True
    try:
        yield
    finally:
        _forced[0] = saved


def _c_can_run(live: torch.Tensor, master: torch.Tensor | None, index: torch.Tensor | None) -> bool:
    if _forced[0] or live.device.type != "cpu" or not live.is_contiguous() or live.dtype not in DTYPES:
        return False
    if master is not None and (master.device.type != "cpu" or not master.is_contiguous()):
        return False
    if index is not None and (index.device.type != "cpu" or not index.is_contiguous()):
        return False
    return _library() is not None


def zpass(live: torch.Tensor, offset: int, direction: str, terms: Sequence[tuple[int, float]] = (), *,
          master: torch.Tensor | None = None, index: torch.Tensor | None = None,
          live_terms: Sequence[tuple[int, float]] = (), decay: tuple[int, float] | None = None) -> None:
    """One pass over trainable values whose first has global index ``offset``, in float32 arithmetic.

    Without ``master``: ``live`` gets ``terms`` in order, each ``x = x + coef * z(seed)`` rounded to
    live's dtype as a pass of its own would leave it, and ``decay = (k, factor)`` multiplies by factor
    before term k (k = len(terms): after the last). So one call is bit for bit the same as that sequence
    of separate calls (the fold of restore, decay, update and next perturbation into one pass).

    With ``master`` (float32, one value per trainable value): ``master`` gets ``terms`` and ``decay``
    (unrounded), then ``live`` gets ``master + live_terms`` rounded once to its dtype, at the flat
    ``index`` (int64, every one in range: the caller's check) or, without one, at every position.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction '{direction}'")
    if master is None and (live_terms or index is not None):
        raise ValueError("live_terms and index need a master")
    if master is not None and (master.dtype != torch.float32 or master.dim() != 1):
        raise ValueError("the master must be a flat float32 tensor")
    if index is not None and (index.dtype != torch.int64 or index.numel() != master.numel()):
        raise ValueError("index: one int64 position per master value")
    if master is not None and index is None and master.numel() != live.numel():
        raise ValueError("a master without an index covers all of live")
    all_terms = [*terms, *live_terms]
    seeds = [int(s) for s, _ in all_terms]
    if any(not 0 <= s < 2**64 for s in seeds):
        raise ValueError("seeds are 64-bit unsigned")
    coefs = [float(c) for _, c in all_terms]
    decay_at, factor = (int(decay[0]), float(decay[1])) if decay is not None else (-1, 1.0)
    if not -1 <= decay_at <= len(terms):
        raise ValueError("decay position out of range")
    args = (live, offset, direction, seeds, coefs, len(terms), decay_at, factor, master, index)
    t = time.perf_counter()
    if _c_can_run(live, master, index):
        c_pass(_state["lib"], *args)
        way = C_PATH
    else:
        philox.run_pass(*args)
        way = TORCH_PATH
    _passes["seconds"] += time.perf_counter() - t
    n = master.numel() if master is not None else live.numel()
    # each touched live value read and written, the master's too, the index read
    _passes["bytes"] += n * (2 * live.element_size() + (8 if master is not None else 0)
                             + (8 if index is not None else 0))
    _passes["calls"][way] = _passes["calls"].get(way, 0) + 1


def pass_stats(reset: bool = False) -> dict:
    """The passes this process ran since the last reset: ``{"calls": {path: n}, "bytes", "seconds"}``, the
    bytes being those read and written (live values, float32 masters, indices)."""
    out = {"calls": dict(_passes["calls"]), "bytes": _passes["bytes"], "seconds": _passes["seconds"]}
    if reset:
        _passes.update(calls={}, bytes=0, seconds=0.0)
    return out


def c_pass(lib: ctypes.CDLL, live: torch.Tensor, offset: int, direction: str, seeds: list[int],
           coefs: list[float], nmaster: int, decay_at: int, decay: float, master: torch.Tensor | None = None,
           index: torch.Tensor | None = None) -> None:
    """``zo_pass`` of the C library ``lib`` on CPU tensors; the arguments as ``philox.run_pass`` takes them."""
    n = master.numel() if master is not None else live.numel()
    k = max(len(seeds), 1)
    lib.zo_pass(DIRECTIONS[direction], DTYPES[live.dtype], n, offset, live.data_ptr(),
                None if index is None else index.data_ptr(), None if master is None else master.data_ptr(),
                (ctypes.c_uint64 * k)(*seeds), (ctypes.c_float * k)(*coefs), len(seeds), nmaster, decay_at,
                decay, torch.get_num_threads())


def fill_z(out: torch.Tensor, offset: int, direction: str, seed: int) -> torch.Tensor:
    """``out`` (float32) = z(seed) at global indices ``offset`` ..: for optimizers that need z itself."""
    out.zero_()
    zpass(out, offset, direction, [(seed, 1.0)])  # 0 + 1 * z is z exactly
    return out


def block(ctr: Sequence[int], key: Sequence[int]) -> list[int]:
    """The bare Philox4x32-10 block function of the C library (for the known-answer test)."""
    lib = _library()
    if lib is None:
        raise BuildError(_state["reason"])
    words = ctypes.c_uint32 * 4
    out = words()
    lib.zo_philox(words(*ctr), (ctypes.c_uint32 * 2)(*key), out)
    return list(out)
