"""Shared fixtures: the embedded tokenizer, a tiny random Llama, and the benchmark data beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the project")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    from zobench.models import builtin_tokenizer

    return builtin_tokenizer()


@pytest.fixture()
def tiny():
    """A fresh tiny random Llama (2 layers, hidden 64) with the embedded tokenizer; float32, seed 0."""
    from zobench.models import load_model

    return load_model("random:tiny-llama", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs and 2 declared GPUs, started once for the session (the Ray executor and the
    Ray cache builder reuse a running Ray)."""
    pytest.importorskip("ray")
    from zobench.gates.ray import connect

    ray, started = connect(num_cpus=2, num_gpus=2)
    yield ray
    if started:
        ray.shutdown()
