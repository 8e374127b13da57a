"""Shared fixtures: the embedded tokenizer, a tiny random Llama, the benchmark data beside the project, and
runs shared by several test modules (the tiny suite on the local executor, one cell of every method)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_SUITE = Path(__file__).resolve().parent / "data" / "tiny_suite.yaml"


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
def tiny_suite_run(tmp_path_factory) -> Path:
    """The results file of ``tests/data/tiny_suite.yaml`` run once for the session, cell after cell in
    processes of this machine (the local executor): the reference that the pool's and Ray's runs of the same
    suite are compared with."""
    from zobench.driver import run_suite
    from zobench.executors.local import LocalExecutor
    from zobench.spec.suite import load_suite

    return run_suite(load_suite(TINY_SUITE), tmp_path_factory.mktemp("tiny-suite"), executor=LocalExecutor())


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


@pytest.fixture(scope="session")
def every_method(tmp_path_factory) -> dict:
    """One cell of every registered method on the tiny model (two steps; a random-weight model is never
    evaluated), each in its own process, two at a time (a cell's peak is its own process's, whatever runs
    beside it): method -> record.
    The methods' smoke path (tests/test_methods.py) and the estimator's per-phase check share it."""
    from zobench.driver import run_suite
    from zobench.executors.pool import PoolExecutor
    from zobench.methods import METHODS
    from zobench.results import load_records
    from zobench.spec.suite import parse_suite

    cell = {"model": "random:tiny-llama", "task": "sst2", "n_train": 8, "n_dev": 0, "n_test": 0, "batch_size": 4,
            "max_length": 32, "steps": 2, "warmup_steps": 1, "eval_before": False, "eval_after": False,
            "calib_sequences": 2, "calib_length": 32, "density": 0.01, "lr": 1e-4}
    suite = parse_suite({"name": "methods", "reference": False, "defaults": cell,
                         "matrix": {"method": METHODS.names()},
                         # a method that trains quantization scales needs a backend that has plain ones
                         "overrides": [{"match": {"method": "qzo"}, "set": {"quant": "nf4-plain"}},
                                       {"match": {"method": "quzo"}, "set": {"quant": "int8"}}]},  # its codes
                        "methods.yaml")
    out = run_suite(suite, tmp_path_factory.mktemp("methods"), executor=PoolExecutor(jobs=2))
    return {r.method: r for r in load_records(out)}
