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

On a GPU the same cell measures the device-level floor (what the driver reports for the process: the
CUDA context, the libraries' kernels, cuBLAS workspaces, the allocator's slack), cached the same way. On
a machine without one, a CUDA estimate uses the figure measured on an H200 below, and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Used only when the measurement itself cannot run (and said so in every estimate that uses it): the
# development machine's floor (results/bench/measurements.md).
FALLBACK_CPU_MIB = 385.0
# Used for CUDA estimates made without a GPU: an NVIDIA H200 (driver 580.159, torch 2.11.0+cu130,
# transformers 5.17), where the tests' tiny Llama forward cell (float16, 8 x 64 tokens) peaked at 796 MiB
# of device memory in its train phase (NVML, per process), of which 73 MiB were allocated tensors: the
# floor is the rest. A GPU node measures its own (``framework("cuda")``, bench/framework_rss.py).
FALLBACK_CUDA_MIB = 723.0
FALLBACK_CUDA_WHY = "not measured on this machine: the floor measured on an NVIDIA H200 (torch 2.11, CUDA 13)"
FALLBACKS = {"cpu": (FALLBACK_CPU_MIB, "not measured on this machine"), "cuda": (FALLBACK_CUDA_MIB, FALLBACK_CUDA_WHY)}
# Part of the cache key: bumped when zobench changes what every cell's process holds, so no machine keeps
# an older footprint. 2: cells stopped importing hqq and torch's compiler (zobench.models.imports).
FORMAT = 2
REPEATS = 2
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "bitsandbytes",
            "gptqmodel", "hqq", "numpy", "zobench")

# Weights of this model: about 3k values (vocab 64 x hidden 16, one layer): nothing against the floor.
NEGLIGIBLE_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
    "vocab_size": 64, "max_position_embeddings": 512, "tie_word_embeddings": True, "pad_token_id": 2,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "rms_norm_eps": 1e-5,
}

_MEMO: dict[str, dict] = {}


def machine_key(device: str = "cpu") -> str:
    """What the footprint depends on: device kind, CPU, Python, installed versions, child malloc settings."""
    from zobench.executors.local import CHILD_ENV
    from zobench.measure.env import cpu_name, package_version

    facts = {"format": FORMAT, "device": device, "cpu": cpu_name(), "machine": platform.machine(),
             "python": platform.python_version(), "child_env": CHILD_ENV,
             "versions": {p: package_version(p) for p in PACKAGES}}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _path(key: str) -> Path:
    from zobench.models.load import cache_dir

    return cache_dir() / "calibration" / f"framework-{key}.json"


def framework(device: str = "cpu", measure: bool = True) -> dict:
    """``{"framework_mib", "source", ...}`` for estimates on ``device`` ("cpu" or "cuda").

    ``source`` is "measured" (this machine and these versions; ``key`` and ``measured_at`` say which
    measurement) or "default" (with ``why``): the fallback constant when nothing could be measured.
    """
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    fallback = FALLBACKS[device]
    if device == "cuda" and not _has_cuda():
        return {"framework_mib": fallback[0], "source": "default", "why": fallback[1]}
    key = machine_key(device)
    if key in _MEMO:
        return _MEMO[key]
    path = _path(key)
    found = _read(path)
    if found is None and measure:
        found = _measure_and_store(path, key, device)
    if found is None:
        return {"framework_mib": fallback[0], "source": "default", "why": fallback[1]}
    _MEMO[key] = found
    return found


def _has_cuda() -> bool:
    try:
        import torch

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


def _measure_and_store(path: Path, key: str, device: str) -> dict | None:
    print("zobench: measuring this machine's framework footprint for the memory estimator (once, ~20 s)",
          file=sys.stderr, flush=True)
    try:
        peaks = measure(device, REPEATS)
    except Exception as e:  # never fail an estimate on its calibration: fall back, and say why
        why = f"calibration failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        print(f"zobench: warning: {why}; using the default footprint", file=sys.stderr)
        return {"framework_mib": FALLBACKS[device][0], "source": "default", "why": why}
    data = {"framework_mib": round(statistics.median(peaks), 3), "source": "measured", "key": key,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs_mib": peaks}
    try:
        from zobench.files import atomic_write

        atomic_write(path, json.dumps(data, indent=1), "calibration")
    except Exception:  # an unwritable cache: use the measurement now, measure again next time
        pass
    return data


def measure(device: str = "cpu", repeats: int = REPEATS) -> list[float]:
    """Train-phase peaks (MiB) of ``repeats`` negligible forward cells, each in a fresh process."""
    from zobench.analysis.derive import train_peak_mib
    from zobench.driver import prepare_models
    from zobench.executors.local import LocalExecutor
    from zobench.spec.matrix import expand
    from zobench.spec.suite import parse_suite

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "negligible-llama.json"
        config.write_text(json.dumps(NEGLIGIBLE_LLAMA))
        suite = parse_suite({"name": "framework", "reference": False, "defaults": {
            "model": f"random:{config}", "method": "forward", "task": "sst2", "batch_size": 1,
            "max_length": 8, "n_train": 8, "n_dev": 0, "n_test": 0, "steps": 4, "warmup_steps": 1,
            "eval_before": False, "eval_after": False, "device": device}}, "framework calibration")
        (cell,) = expand(suite)
        prepare_models([cell])
        peaks = []
        for _ in range(repeats):
            with LocalExecutor() as executor:
                executor.submit(cell, 300)
                ((_, rec),) = list(executor.finished())
            if not rec.ok:
                raise RuntimeError(f"calibration cell {rec.status}: {rec.reason}")
            peaks.append(round(train_peak_mib(rec), 3))
    return peaks


if __name__ == "__main__":  # python -m zobench.analysis.calibration: measure now and print
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps({"measured_mib": measure(), "key": machine_key()}))
