"""Synthetic claims runs for the tests of verdicts, the README status and the pandas frames: records whose
per-example test predictions are right on a known share of N examples, declared under ``claims()``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from zobench.cell.measures import Metrics
from zobench.cell.predictions import Predictions
from zobench.cell.record import CellRecord
from zobench.results import append_record
from zobench.spec.claims import claims_hash, parse_claims

N = 600


def claims(margin: float = 0.0, resamples: int = 2000) -> list:
    return parse_claims({"alpha": 0.05, "resamples": resamples, "seed": 0,
                         "failed_if": {"accuracy_at_most_majority_plus": 0.02},
                         "items": [{"id": "s-beats-r", "name": "sensitive beats random", "kind": "superiority",
                                    "a": {"method": "sensitive"}, "b": {"method": "random"},
                                    "metric": "test_best", "margin": margin},
                                   {"id": "s-like-f", "kind": "non_inferiority", "a": {"method": "sensitive"},
                                    "b": {"method": "full"}, "metric": "test_best", "margin": 0.05}]}, "t.yaml")


def run(folder: Path, method: str, seed: int, accuracy: float, declared: list, rng, cell: str = "") -> CellRecord:
    """A record whose test predictions are right on about ``accuracy`` of N examples (ids shuffled, so the
    reader must align them)."""
    gold = rng.integers(0, 2, N)
    right = rng.random(N) < accuracy
    pred = np.where(right, gold, 1 - gold)
    ids = rng.permutation(N)
    cell = cell or f"{method}-{seed}"
    keep = Predictions(folder / "t.predictions" / f"{cell}.npz")
    keep.add("test_best", {"id": ids, "gold": gold, "pred": pred, "scores": np.zeros((N, 2))})
    desc = keep.write()
    desc["path"] = str(Path(desc["path"]).relative_to(folder))
    m = Metrics()
    m.set(test_best={"accuracy": float(right.mean())}, test_after={"accuracy": float(right.mean())},
          loss_curve=[0.7] * 20)
    return CellRecord(cell_id=cell, config={"method": method, "seed": seed}, labels={"method": method},
                      metrics=m, predictions=desc, suite="t",
                      claims={"hash": claims_hash(declared), "declared": [asdict(c) for c in declared]})


def write_results(folder: Path) -> Path:
    """Four seeds of sensitive (80% right), random (66%) and full (79%), their predictions beside them."""
    rng = np.random.default_rng(7)
    declared = claims()
    out = folder / "t.jsonl"
    for seed in range(4):
        append_record(out, run(folder, "sensitive", seed, 0.80, declared, rng))
        append_record(out, run(folder, "random", seed, 0.66, declared, rng))
        append_record(out, run(folder, "full", seed, 0.79, declared, rng))
    return out


def suite_declaring(folder: Path, margin: float) -> Path:
    """The fixture's suite file with its claims (``claims()``), s-beats-r's margin as given."""
    suite_file = folder / "s.yaml"
    suite_file.write_text(
        "name: t\ndefaults:\n  model: random:tiny-llama\nmatrix:\n  method: [sensitive, random, full]\n"
        "  seed: [0, 1, 2, 3]\nclaims:\n  alpha: 0.05\n  resamples: 2000\n  seed: 0\n"
        "  failed_if: {accuracy_at_most_majority_plus: 0.02}\n  items:\n"
        "    - {id: s-beats-r, name: sensitive beats random, kind: superiority, a: {method: sensitive},\n"
        f"       b: {{method: random}}, metric: test_best, margin: {margin}}}\n"
        "    - {id: s-like-f, kind: non_inferiority, a: {method: sensitive}, b: {method: full},\n"
        "       metric: test_best, margin: 0.05}\n")
    return suite_file
