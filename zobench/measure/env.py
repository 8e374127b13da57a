"""The environment a record was measured in: versions, hardware, threads, allocator settings (and, from
``measure.machine``, what needs no torch)."""

from __future__ import annotations

import functools
import os
import platform

import torch

from zobench.gates import pynvml
from zobench.measure.machine import cpu_flags, cpu_name, machine_name, package_version
from zobench.procs import malloc_env

PACKAGES = ("torch", "transformers", "bitsandbytes", "gptqmodel", "hqq", "peft", "safetensors", "zobench")


def gpu_info() -> dict:
    if not torch.cuda.is_available():
        return {}
    info = {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda}
    try:
        nvml = pynvml.load()
        nvml.nvmlInit()
        info["driver"] = nvml.nvmlSystemGetDriverVersion()
        h = nvml.nvmlDeviceGetHandleByIndex(0)
        info["gpu_memory_mib"] = nvml.nvmlDeviceGetMemoryInfo(h).total // (1024 * 1024)
        nvml.nvmlShutdown()
    except Exception as e:  # NVML missing or unusable: the record says so instead of failing
        info["nvml_error"] = str(e).splitlines()[0][:200]
    return info


@functools.cache
def this_machine() -> str:
    """This process's machine in the words ``machine.machine_name`` uses (CPU model and cores, GPU model): a
    checkpoint names each segment's with it, and a resumed record compares them with each other, not with its
    ``env`` (the driver's, which on a Ray cluster is another node)."""
    env = {"cpu": cpu_name(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return machine_name(env)


def environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
           "cpu_flags": cpu_flags(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "malloc": malloc_env()}
    env["versions"] = {p: package_version(p) for p in PACKAGES if package_version(p)}
    env.update(gpu_info())
    return env
