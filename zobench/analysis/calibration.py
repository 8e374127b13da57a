"""The framework footprint, measured on the machine that runs the estimate: what a cell's process holds
whatever the model (the interpreter, torch, transformers and what they import, the tokenizer, kernel state
after a first forward).

The memory estimator adds it to every CPU cell's predicted peak. It depends on the machine and the
installed packages, not on the model (a 3k-parameter Llama's forward cell measures it), so it is measured
once per (machine, installed versions) and cached under ``<cache>/calibration/``: a new machine or an
upgraded package gets a fresh measurement, and every estimate says which calibration it used.

The measurement is the most literal one: a real ``forward`` cell through the launcher (a fresh spawned
child, the launcher's malloc settings, the same phases and peak accounting as any suite cell) on a Llama
so small that its weights and activations are a few KiB. Its train-phase peak is the floor of any cell.
Running that cell is the driver's job (``zobench.driver.calibrate``: every command that estimates calls it
first); this module only reads the figure, and never launches a cell.

On a GPU the same cell measures the device-level floor (what the driver reports for the process: the
CUDA context, the libraries' kernels, cuBLAS workspaces, the allocator's slack), cached the same way. On
a machine without one, a CUDA estimate uses the figure measured on an H200 below, and says so.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

from zobench.files import cache_dir
from zobench.measure.machine import cpu_name, package_version
from zobench.procs import child_env, malloc_env
from zobench.quant import get_backend

# Used only when the measurement itself cannot run (and said so in every estimate that uses it): the
# development machine's floor (results/bench/measurements.md).
FALLBACK_CPU_MIB = 385.0
# Used for CUDA estimates made without a GPU: an NVIDIA H200 (driver 580.159, torch 2.11.0+cu130,
# transformers 5.17), where the tests' tiny Llama forward cell (float16, 8 x 64 tokens) peaked at 796 MiB
# of device memory in its train phase (NVML, per process), of which 73 MiB were allocated tensors: the
# floor is the rest. A GPU node measures its own (``framework("cuda")``, bench/framework_rss.py).
FALLBACK_CUDA_MIB = 723.0
# A GPU cell's host memory floor (its process's RSS: interpreter, torch, the CUDA libraries' host side and,
# after a first forward, the kernels it loaded): the H200's tiny cells' train-phase peak RSS, 1,702-1,755
# MiB, and their load phase's (no forward yet), 1,098-1,099 MiB (results/gpu/smoke-cuda.jsonl). A GPU node's
# calibration measures its own (``host_mib``, ``host_load_mib``).
FALLBACK_CUDA_HOST_MIB = 1755.0
FALLBACK_CUDA_HOST_LOAD_MIB = 1099.0
FALLBACK_CUDA_WHY = "not measured on this machine: the floor measured on an NVIDIA H200 (torch 2.11, CUDA 13)"
FALLBACKS = {"cpu": (FALLBACK_CPU_MIB, "not measured on this machine"), "cuda": (FALLBACK_CUDA_MIB, FALLBACK_CUDA_WHY)}
# Part of the cache key: bumped when zobench changes what every cell's process holds, so no machine keeps
# an older footprint. 2: cells stopped importing hqq and torch's compiler (zobench.models.imports). 3: a CPU
# calibration keeps its cell's load-phase peak too (``load_floor``).
FORMAT = 3
REPEATS = 2
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "bitsandbytes",
            "gptqmodel", "hqq", "numpy", "zobench")

_MEMO: dict[str, dict] = {}


def machine_key(device: str = "cpu", quant: str = "none") -> str:
    """What the footprint depends on: device kind, CPU, Python, installed versions, child allocator settings
    (malloc's; on a GPU also torch's CUDA allocator's), and the quant backend the cell was measured with
    (``floor_quant``; "none" keeps the keys floors always had)."""
    env = {**child_env(), **malloc_env()}  # the floor's cell runs with malloc: release, the default
    if device == "cpu":
        env.pop("PYTORCH_CUDA_ALLOC_CONF")  # no bearing on a CPU cell: CPU floors keep their keys
    facts = {"format": FORMAT, "device": device, "cpu": cpu_name(), "machine": platform.machine(),
             "python": platform.python_version(), "child_env": env,
             "versions": {p: package_version(p) for p in PACKAGES}}
    if quant != "none":
        facts["quant"] = quant
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def path_of(key: str) -> Path:
    return cache_dir() / "calibration" / f"framework-{key}.json"


def floor_quant(device: str, quant: str) -> str:
    """The quant backend a cell's floor is measured with: its own on a CPU where the backend says so
    (``Backend.measures_floor``), else none (the plain floor, plus the backend's ``import_rss_mib``)."""
    if quant == "none" or str(device).startswith("cuda"):
        return "none"
    return quant if get_backend(quant).measures_floor else "none"


def framework(device: str = "cpu", quant: str = "none") -> dict:
    """``{"framework_mib", "source", ...}`` for estimates on ``device`` ("cpu" or "cuda").

    ``source`` is "measured" (this machine and these versions; ``key`` and ``measured_at`` say which
    measurement) or "default" (with ``why``): the fallback constant where nothing was measured, or where
    the measurement failed (``zobench.driver.calibrate`` says why). ``quant``: the backend the floor was
    measured with (``floor_quant``); absent where it is the plain floor, which is also what a backend's
    cell gets before its own floor is measured.
    """
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    fallback = FALLBACKS[device]
    if device == "cuda" and not has_cuda():
        return {"framework_mib": fallback[0], "source": "default", "why": fallback[1]}
    quant = floor_quant(device, quant)
    key = machine_key(device, quant)
    if key in _MEMO:
        return _MEMO[key]
    found = _read(path_of(key))
    if found is None:
        if quant != "none":  # not measured with this backend here: the plain floor (its ``quant`` says so)
            return framework(device)
        return {"framework_mib": fallback[0], "source": "default", "why": fallback[1]}
    _MEMO[key] = found
    return found


def host_floor(device: str = "cuda", phase: str = "train") -> float:
    """A GPU cell's host memory floor in MiB, in its load phase (before any forward) or after (the
    calibration cell's peak RSS where this node measured it, else the H200's)."""
    key, fallback = ("host_load_mib", FALLBACK_CUDA_HOST_LOAD_MIB) if phase == "load" else \
        ("host_mib", FALLBACK_CUDA_HOST_MIB)
    found = framework(device).get(key)
    return float(found) if isinstance(found, (int, float)) else fallback


def load_floor(device: str = "cpu") -> float:
    """A cell's floor in its load phase, on the plain footprint (no backend imported yet): on a CPU the
    calibration cell's load-phase peak RSS (reading its data and tokenizer leaves transients the train
    phase no longer holds, and a forward's kernel state comes later: on an Intel Xeon 443 MiB where the
    train phase's floor is 410, and SmolLM2's mapped load measured 434-438). Elsewhere, or for a calibration
    from before it was kept, the floor itself."""
    floor = framework(device)
    found = floor.get("load_mib") if str(device) == "cpu" else None
    return float(found) if type(found) in (int, float) and found > 0 else float(floor["framework_mib"])


def needs_measuring(device: str, quant: str = "none") -> bool:
    """Whether ``framework(device, quant)`` has no measurement of its own on this machine yet."""
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    if device == "cuda" and not has_cuda():
        return False  # without a GPU, CUDA estimates use the recorded H200 figure: nothing to run
    key = machine_key(device, floor_quant(device, quant))
    return key not in _MEMO and _read(path_of(key)) is None


def remember(device: str, data: dict, quant: str = "none") -> None:
    """What a calibration run measured (or why it failed) for ``device`` (with ``quant``), for this process's
    estimates."""
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    _MEMO[machine_key(device, floor_quant(device, quant))] = data


def has_cuda() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("framework_mib"), (int, float)):
        return None
    return data
