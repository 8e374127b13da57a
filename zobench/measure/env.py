"""The environment a record was measured in: versions, hardware, threads, allocator settings, git state."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "transformers", "bitsandbytes", "gptqmodel", "hqq", "peft", "safetensors", "zobench")


def package_version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    info = {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda}
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        info["gpu_memory_mib"] = pynvml.nvmlDeviceGetMemoryInfo(h).total // (1024 * 1024)
        pynvml.nvmlShutdown()
    except Exception as e:  # NVML missing or unusable: the record says so instead of failing
        info["nvml_error"] = str(e).splitlines()[0][:200]
    return info


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    env["versions"] = {p: package_version(p) for p in PACKAGES if package_version(p)}
    env.update(gpu_info())
    return env


def git_state(cwd: str | Path = ".") -> dict:
    """Commit and dirty flag of the working tree, or {} outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {}
