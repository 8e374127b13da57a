"""GPU memory as the driver reports it (NVML), which is what an 8 GiB card has to hold.

The allocator's ``max_memory_allocated`` misses the CUDA context (~500 MiB), cuBLAS workspaces, the
caching allocator's slack and libraries' own buffers (bitsandbytes); ``nvidia-smi`` shows all of them.
``DeviceMemory`` samples, every few milliseconds in a thread, the memory NVML reports for every device
this process can see (``CUDA_VISIBLE_DEVICES`` resolved by UUID, so the numbering of CUDA and NVML need
not agree):

    source "process"   this process's own usage, where the driver reports per-process figures
    source "device"    the device's used memory minus its level before this process's first phase
                       (other processes on the device then count too; the record says which it is)

``result()`` gives the peak summed over devices (``device_peak_mib``), and the source. Without NVML (no
driver, no ``nvidia-ml-py``) it says why and measures nothing.
"""

from __future__ import annotations

import os
import threading

import torch

from zobench.gates import pynvml

MIB = 1024 * 1024
_BEFORE: dict[int, list[int]] = {}  # per process: each device's used bytes when the first phase began


def _visible_handles(nvml) -> list:
    """NVML handles of the devices CUDA numbers 0..n-1 for this process."""
    try:
        if torch.cuda.is_available():
            out = []
            for i in range(torch.cuda.device_count()):
                uuid = str(torch.cuda.get_device_properties(i).uuid)
                out.append(nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-"))
                                                          else f"GPU-{uuid}"))
            return out
    except Exception:  # an older torch without .uuid, or a MIG slice NVML names differently
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return [nvml.nvmlDeviceGetHandleByUUID(v) if not v.isdigit() else nvml.nvmlDeviceGetHandleByIndex(int(v))
            for v in ids]


class DeviceMemory(threading.Thread):
    """``start()`` at a phase's beginning, ``stop()`` at its end, then ``result()``."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self._stop_event = interval, threading.Event()
        self.error: str | None = None
        self.handles, self.baseline, self.peaks, self.source = [], [], [], None
        try:
            nvml = pynvml.load()
            nvml.nvmlInit()
            self.nvml = nvml
            self.handles = _visible_handles(nvml)
            self.baseline = _BEFORE.setdefault(os.getpid(), [nvml.nvmlDeviceGetMemoryInfo(h).used
                                                             for h in self.handles])
            self.peaks = [0] * len(self.handles)
            self.source = "process" if self._own(self.handles[0]) is not None else "device" if self.handles else None
        except Exception as e:  # no driver, no library, no device: say so, measure nothing
            self.error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:200]
            self.handles = []
        if not self.handles and self.error is None:
            self.error = "no visible GPU"

    def _own(self, handle) -> int | None:
        """This process's bytes on ``handle``, or None where the driver does not say (containers often)."""
        try:
            for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == os.getpid() and isinstance(p.usedGpuMemory, int):
                    return p.usedGpuMemory
            return 0 if self.source == "process" else None
        except Exception:
            return None

    def sample(self) -> None:
        for i, h in enumerate(self.handles):
            if self.source == "process":
                used = self._own(h) or 0
            else:
                used = self.nvml.nvmlDeviceGetMemoryInfo(h).used - self.baseline[i]
            self.peaks[i] = max(self.peaks[i], used)

    def run(self) -> None:
        while True:
            self.sample()
            if self._stop_event.wait(self.interval):
                break

    def start(self) -> "DeviceMemory":
        if self.handles:
            super().start()
        return self

    def stop(self) -> dict:
        if self.handles:
            self._stop_event.set()
            self.join()
            self.sample()
        return self.result()

    def result(self) -> dict:
        if not self.handles:
            return {}
        return {"device_peak_mib": sum(self.peaks) / MIB, "device_source": self.source}
