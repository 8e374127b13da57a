"""Peak memory per phase.

CPU (Linux): the kernel's resident high-water mark VmHWM, reset at the start of each phase by writing
"5" to /proc/self/clear_refs, so each phase gets its own peak. Elsewhere a sampling thread stands in.
CUDA: the allocator's peaks (max allocated / reserved), reset per phase, and the device memory the driver
reports (NVML, ``zobench.measure.device``), sampled during the phase.

glibc keeps freed memory in its heap, which would inflate later phases' RSS; each phase (and the training
phase again after a dev evaluation set aside) starts by handing the heap's free pages back to the OS
(``malloc_trim``), as a CUDA phase starts by emptying the caching allocator: a phase's peak is then its own,
not the heap's history. Within a phase, what glibc keeps of the phase's own freed blocks counts or not by
the cell's ``malloc`` setting (``zobench.procs``). The quantize loop trims after each layer it replaces
(``trim_heap``, ``quant.base``): under glibc's defaults the heap kept every replaced float weight to the
phase's end, and SmolLM2's quantize phase peaked up to twice its live memory, by the heap's state.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import threading
from pathlib import Path

import psutil
import torch

from zobench.measure.device import DeviceMemory

MIB = 1024 * 1024
_PROC = Path("/proc/self")


def current_rss_mib() -> float:
    return psutil.Process().memory_info().rss / MIB


def _read_hwm_mib() -> float | None:
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def file_huge_mib() -> float | None:
    """How much of this process's mapped files is mapped in 2 MiB pages (``FilePmdMapped``), None where the
    kernel does not say. A model file another process has kept mapped for long may sit in the page cache in
    such pages (a filesystem's large folios, or khugepaged); touching one value then maps a whole one, so a
    mapped checkpoint's pages count high in RSS (results/bench/measurements.md): a phase records it, and the
    report says so, when it is not 0."""
    try:
        for line in (_PROC / "smaps_rollup").read_text().splitlines():
            if line.startswith("FilePmdMapped:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere), without a
    garbage collection: cheap enough (about a millisecond on a heap of a few hundred MiB, besides the page
    faults of memory used again) to call after each layer of a loop that frees large blocks."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def release_freed_heap() -> None:
    """Collect Python's garbage and hand the heap's free pages back to the OS (glibc's ``malloc_trim``; a
    no-op elsewhere). Frees nothing that is live."""
    gc.collect()
    trim_heap()


def _reset_hwm() -> bool:
    try:
        (_PROC / "clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Fallback peak RSS where the kernel offers no resettable high-water mark."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, current_rss_mib(), threading.Event()

    def run(self):
        proc = psutil.Process()
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, proc.memory_info().rss / MIB)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak, current_rss_mib())


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as m: ...`` then ``m.result`` (a dict of ``*_mib``)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.result: dict[str, float] = {}

    def __enter__(self):
        self._sampler, self._kept = None, {}
        release_freed_heap()
        self._hwm = _reset_hwm() and _read_hwm_mib() is not None
        if not self._hwm:
            self._sampler = _Sampler()
            self._sampler.start()
        self._start_rss = current_rss_mib()
        if self.device.startswith("cuda"):
            # The driver's baseline (the device's used memory the first time a process measures) is read
            # before this process touches CUDA, so its context and kernels count in device_peak_mib.
            device = DeviceMemory()
            # Each phase starts from what is live: memory the caching allocator kept from an earlier phase
            # (the float16 weights and gradients of a sensitive mask, say) goes back to the driver, so the
            # driver's figure is what a card running this phase alone would hold.
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._device = device.start()
        return self

    def _peaks(self) -> dict:
        """The peaks so far; the sampling threads are stopped."""
        out = {"peak_rss_mib": _read_hwm_mib() if self._hwm else self._sampler.stop()}
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
            out["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
            out.update(self._device.stop())
        return out

    @contextlib.contextmanager
    def set_aside(self):
        """Leave the block out of this measure's peaks (a dev evaluation inside the training phase, measured
        on its own): the peaks so far are kept, and measuring starts again from what is live after it."""
        before = self._peaks()
        try:
            yield
        finally:
            self._kept = highest(self._kept, before)
            release_freed_heap()  # what the evaluation freed is not the training's
            if self._hwm:
                _reset_hwm()
            else:
                self._sampler = _Sampler()
                self._sampler.start()
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self._device = DeviceMemory().start()

    def __exit__(self, *exc):
        self.result = highest(self._peaks(), self._kept)
        self.result.update(start_rss_mib=self._start_rss, end_rss_mib=current_rss_mib(),
                           rss_method="hwm" if self._hwm else "sampled")
        if huge := file_huge_mib():  # only where there is some: most phases have none
            self.result["file_huge_mib"] = huge
        return False


def highest(now: dict, kept: dict) -> dict:
    """``now`` with each peak the higher of its and ``kept``'s (figures missing on one side stay as they are)."""
    out = dict(now)
    for key, value in kept.items():
        if key.endswith("_mib") and isinstance(value, (int, float)):
            out[key] = value if out.get(key) is None else max(out[key], value)
        else:
            out.setdefault(key, value)
    return out
