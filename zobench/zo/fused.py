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
from typing import NamedTuple, Sequence

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
    u64, f64 = ctypes.c_uint64, ctypes.c_double
    lib.zo_uniform.argtypes = [u64, i64, i64, ptr, i32]
    lib.zo_uniform.restype = None
    lib.zo_grid4.argtypes = [ptr, i64, i64, ptr, i32, ptr, ptr, ptr, i32, i32, ptr, ptr, i32, i32, f64, i32, f64,
                             i32, u64, i32, ptr, i32, u64, f64, i32, u64, f64, u64, i32]
    lib.zo_grid4.restype = None
    lib.zo_int8.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, ptr, ptr, i32, i32, f64, i32, f64,
                            i32, u64, i32, i32, u64, f64, i32, u64, f64, u64, i32, ptr, ptr]
    lib.zo_int8.restype = i64
    lib.zo_free.argtypes = [ptr]
    lib.zo_free.restype = None
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


def on_torch_path(t: torch.Tensor) -> bool:
    """Whether passes over tensors on ``t``'s device run the torch fallback (a GPU, or no C library here):
    there each pass costs ~100 kernel launches whatever its length, so callers make few long passes."""
    return not _c_can_run(t, None, None)


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


def c_uniform(seed: int, start: int, n: int) -> torch.Tensor | None:
    """U(0, 1) noise of ``zo.rounding.uniform`` from the C library (float64, CPU), None where it cannot run."""
    lib = None if _forced[0] else _library()
    if lib is None:
        return None
    out = torch.empty(n, dtype=torch.float64)
    lib.zo_uniform(int(seed), int(start), int(n), out.data_ptr(), torch.get_num_threads())
    return out


GRID4_MODES = {"perturb": 0, "restore": 1, "update": 2}


def _then(then: tuple[int, float, int | None] | None) -> tuple:
    """A pass's ``then`` (seed, signed eps, noise seed or None) as the C call's four arguments."""
    if then is None:
        return 0, 0, 0.0, 0
    seed, coef, noise = then
    return 1, int(seed), float(coef), int(noise or 0)


def c_grid4(packed: torch.Tensor, n: int, offset: int, absmax: torch.Tensor, blocksize: int, grid,
            direction: str, terms: Sequence[tuple[int, float]], mode: str, moved: torch.Tensor, *, lr: float = 0.0,
            decay_coef: float | None = None, noise_seed: int | None = None, antithetic: bool = False,
            restore: tuple[int, float] | None = None, then: tuple[int, float, int | None] | None = None) -> bool:
    """QuZO's pass over one 4-bit layer's ``n`` packed codes (``zo_grid4`` in zo_pass.c), in place, on the C
    library: ``perturb`` moves each value at most one level and sets its bit in ``moved`` (uint8, one bit a
    value) where it moved, ``restore`` takes that perturbation back from the bits, ``update`` moves every value;
    ``restore`` = (seed, signed eps) of a pending perturbation whose bits are in ``moved``: taken back first,
    in the same pass. ``then`` = (seed, signed eps, noise seed) of a perturbation made straight after the
    pass's update, tile by tile while the codes are in cache (``CodeTrainable.fold_step``): one pass over the
    layer's memory where an update and an ``apply`` make two, the same codes. False where it cannot run here
    (then the caller's torch path does the same): not a CPU, a block size that is not a power of two, or an
    ``offset`` not a multiple of 8 (two tiles would share a byte of the bits)."""
    levels, rank, code_of = grid
    tensors = (packed, absmax, levels, rank, code_of, moved)
    if (_forced[0] or offset % 8 or blocksize < 1 or blocksize & (blocksize - 1) or 2 * packed.numel() < n
            or moved.numel() * 8 < n or moved.dtype != torch.uint8
            or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors)
            or packed.dtype != torch.uint8 or absmax.dtype != torch.float32 or levels.dtype != torch.float64
            or rank.dtype != torch.int64 or code_of.dtype != torch.int64 or _library() is None):
        return False
    k = max(len(terms), 1)
    seeds = (ctypes.c_uint64 * k)(*[int(s) for s, _ in terms])
    coefs = (ctypes.c_double * k)(*[float(c) for _, c in terms])
    r_seed, r_coef = restore if restore is not None else (0, 0.0)
    t = time.perf_counter()
    _state["lib"].zo_grid4(packed.data_ptr(), int(n), int(offset), absmax.data_ptr(),
                           int(blocksize).bit_length() - 1, levels.data_ptr(), rank.data_ptr(), code_of.data_ptr(),
                           levels.numel(), DIRECTIONS[direction], seeds, coefs, len(terms), GRID4_MODES[mode],
                           float(lr), int(decay_coef is not None), float(decay_coef or 0.0),
                           int(noise_seed is not None), int(noise_seed or 0), int(antithetic), moved.data_ptr(),
                           int(restore is not None), int(r_seed), float(r_coef), *_then(then),
                           torch.get_num_threads())
    _passes["seconds"] += time.perf_counter() - t
    _passes["bytes"] += (n + 1) // 2 * 2 + 4 * absmax.numel() + (n + 7) // 8 * 2  # codes and bits read and written
    _passes["calls"][C_PATH] = _passes["calls"].get(C_PATH, 0) + 1
    return True


INT8_MODES = {"perturb": 0, "restore": 1, "update": 2}


def c_ready(codes: torch.Tensor) -> bool:
    """Whether ``c_int8`` runs on these int8 codes here (a contiguous CPU tensor, the library loaded, no
    ``torch_fallback``)."""
    return (not _forced[0] and codes.dtype == torch.int8 and codes.device.type == "cpu" and codes.is_contiguous()
            and _library() is not None)


class Int8Run(NamedTuple):
    """Values ``start`` .. ``stop - 1`` of one int8 layer, for ``c_int8_runs``."""
    codes: torch.Tensor                   # the layer's codes (contiguous CPU int8; values addressed flat)
    start: int
    stop: int
    cols: int                             # the layer's columns (a row's unit is scb[row] / 127)
    offset: int                           # the global index of the layer's value 0
    scb: torch.Tensor                     # its row absmax (contiguous CPU float32)
    ups: torch.Tensor                     # its bits: value v at bit v + offset % 8
    kept_at: torch.Tensor | None = None   # the pending perturbation's kept positions in the run, from start


def c_int8(codes: torch.Tensor, start: int, stop: int, cols: int, offset: int, scb: torch.Tensor, direction: str,
           terms: Sequence[tuple[int, float]], mode: str, ups: torch.Tensor, *, kept_at: torch.Tensor | None = None,
           **kw) -> torch.Tensor:
    """QuZO's pass over values ``start`` .. ``stop - 1`` of one int8 layer: ``c_int8_runs`` with one run."""
    return c_int8_runs([Int8Run(codes, start, stop, cols, offset, scb, ups, kept_at)], direction, terms, mode, **kw)[0]


def c_int8_runs(runs: Sequence[Int8Run], direction: str, terms: Sequence[tuple[int, float]], mode: str, *,
                lr: float = 0.0, decay_coef: float | None = None, noise_seed: int | None = None,
                antithetic: bool = False, restore: tuple[int, float] | None = None,
                then: tuple[int, float, int | None] | None = None) -> list[torch.Tensor]:
    """QuZO's pass over runs of int8 values (``zo_int8`` in zo_pass.c: one parallel loop over all their tiles),
    in place, where ``c_ready`` holds for every run's codes. ``perturb`` returns, per run, the positions (int64,
    ascending, from its start) of the codes it left alone at the range's edge and writes into each run's
    ``ups`` whether each value's step rounded up; ``restore`` takes the perturbation back with those positions
    as the runs' ``kept_at`` and the bits (no noise drawn); ``update`` moves and clamps (and returns empty
    tensors). ``restore`` = (seed, signed eps) of a pending perturbation, with its positions as ``kept_at``:
    restored first, in the same pass (perturb and update). ``then`` (an update's): a perturbation made
    straight after it, tile by tile (``c_grid4``), whose positions are returned and whose bits go to ``ups``."""
    for r in runs:
        if not c_ready(r.codes) or r.scb.dtype != torch.float32 or r.scb.device.type != "cpu" or \
                not r.scb.is_contiguous():
            raise ValueError("c_int8 runs on contiguous CPU int8 codes and float32 scales with the C library")
        if r.ups.dtype != torch.uint8 or r.ups.device.type != "cpu" or not r.ups.is_contiguous() or \
                r.ups.numel() * 8 < r.codes.numel() + r.offset % 8:
            raise ValueError("c_int8's bits: a contiguous CPU uint8 tensor of a bit per code (after offset % 8)")
    nl, k = len(runs), max(len(terms), 1)
    ats = [r.kept_at.to(torch.int64).contiguous() if r.kept_at is not None and r.kept_at.numel() else None
           for r in runs]
    ptrs, ints = ctypes.c_void_p * nl, ctypes.c_int64 * nl
    r_seed, r_coef = restore if restore is not None else (0, 0.0)
    out, counts = ctypes.c_void_p(), ints()
    t = time.perf_counter()
    m = _state["lib"].zo_int8(nl, ptrs(*[r.codes.data_ptr() for r in runs]), ints(*[r.start for r in runs]),
                              ints(*[r.stop - r.start for r in runs]), ints(*[r.cols for r in runs]),
                              ints(*[r.offset for r in runs]), ptrs(*[r.scb.data_ptr() for r in runs]),
                              ptrs(*[r.ups.data_ptr() for r in runs]),
                              ptrs(*[a.data_ptr() if a is not None else None for a in ats]),
                              ints(*[a.numel() if a is not None else 0 for a in ats]),
                              DIRECTIONS[direction], (ctypes.c_uint64 * k)(*[int(s) for s, _ in terms]),
                              (ctypes.c_double * k)(*[float(c) for _, c in terms]), len(terms), INT8_MODES[mode],
                              float(lr), int(decay_coef is not None), float(decay_coef or 0.0),
                              int(noise_seed is not None), int(noise_seed or 0), int(antithetic),
                              int(restore is not None), int(r_seed), float(r_coef), *_then(then),
                              torch.get_num_threads(), ctypes.byref(out), counts)
    _passes["seconds"] += time.perf_counter() - t
    try:
        if m < 0:
            raise MemoryError("zo_int8: no memory for the kept positions" + (
                "; the codes moved without them, so this model's state is lost" if m == -2 else ""))
        kept = torch.frombuffer((ctypes.c_int64 * m).from_address(out.value), dtype=torch.int64).clone() if m \
            else torch.zeros(0, dtype=torch.int64)
    finally:
        _state["lib"].zo_free(out)
    n = sum(r.stop - r.start for r in runs)
    _passes["bytes"] += 2 * n + (n + 7) // 8
    _passes["calls"][C_PATH] = _passes["calls"].get(C_PATH, 0) + 1
    return list(kept.split(list(counts))) if m else [kept] * nl
