"""The memory estimator: predictions against measured peaks, its breakdown, its CLI and records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zobench.config import CellConfig
from zobench.errors import UserError
from zobench.estimate import estimate_cell, record_estimate
from zobench.results import latest_by_cell, read_records

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.10  # the estimator's stated accuracy against measured train-phase peaks
LLAMA7B = dict(model="meta-llama/Llama-2-7b-hf", model_fallback="random:llama-2-7b", dtype="float16",
               device="cuda", task="sst2", batch_size=16, max_length=256, density=1e-3)


@pytest.fixture(scope="session")
def smoke_records(tmp_path_factory):
    """The smoke suite run for real, once (~1 min on 2 cores): every cell in its own process."""
    from zobench.launcher import run_suite
    from zobench.suite import load_suite

    out = run_suite(load_suite(ROOT / "suites" / "smoke.yaml"), tmp_path_factory.mktemp("smoke"))
    return latest_by_cell(read_records(out))


def _assert_close(rec: dict, est: dict) -> None:
    measured = rec["derived"]["peak_mib"]
    label = " ".join(f"{k}={v}" for k, v in rec["labels"].items())
    assert abs(est["peak_mib"] - measured) <= TOLERANCE * measured, \
        f"{label}: estimated {est['peak_mib']:.0f} MiB, measured {measured:.0f} MiB ({est['breakdown']})"


def test_smoke_cells_within_ten_percent_and_records_carry_the_estimate(smoke_records):
    assert {r["config"]["method"] for r in smoke_records} == {"forward", "full", "random", "sensitive"}
    for rec in smoke_records:
        assert rec["status"] == "ok", rec.get("reason")
        est = estimate_cell(CellConfig.from_dict(rec["config"]))
        _assert_close(rec, est)
        # make_record attached the same prediction (what the report's "est. peak MiB" shows)
        assert rec["estimate"]["peak_mib"] == pytest.approx(est["peak_mib"])
        assert rec["estimate"]["breakdown"] == est["breakdown"]


def test_smollm2_records_within_ten_percent():
    records = [r for r in latest_by_cell(read_records(ROOT / "results" / "smollm2.jsonl"))
               if r.get("status") == "ok" and r.get("device") == "cpu"]
    assert len(records) >= 4
    for rec in records:
        _assert_close(rec, estimate_cell(CellConfig.from_dict(rec["config"])))


@pytest.mark.parametrize("cfg", [
    dict(model="random:tiny-llama", method="full"),
    dict(model="random:tiny-llama", method="sensitive", density=0.01, optimizer="adam"),
    dict(model="smollm2", method="random", quant="nf4", max_length=64),
    dict(LLAMA7B, method="sensitive", quant="nf4"),
    dict(LLAMA7B, method="full", master_fp32=True, optimizer="momentum"),
    dict(model="random:opt-6.7b", dtype="bfloat16", method="forward", device="cpu"),
])
def test_breakdown_adds_up_to_the_total(cfg):
    est = estimate_cell(CellConfig(**cfg))
    assert est["peak_mib"] == pytest.approx(sum(est["breakdown"].values()), abs=0.01)
    assert all(v >= 0 for v in est["breakdown"].values())
    assert est["method"] == cfg["method"] and est["model_numel"] > 0


def test_nf4_block_linears_cost_a_quarter_of_fp16():
    fp16 = estimate_cell(CellConfig(**LLAMA7B, method="forward"))
    nf4 = estimate_cell(CellConfig(**LLAMA7B, method="forward", quant="nf4"))
    assert fp16["model_numel"] == 6_738_415_616  # Llama-2-7B
    linear_fp16 = fp16["linear_numel"] * 2
    other = fp16["breakdown"]["weights_mib"] * 2**20 - linear_fp16  # embeddings, head, norms: unchanged
    linear_nf4 = nf4["breakdown"]["weights_mib"] * 2**20 - other
    # 4 bits plus QLoRA's double-quantized absmax per 64 weights: 0.516 bytes vs 2.
    assert linear_nf4 / linear_fp16 == pytest.approx(0.258, abs=0.003)
    assert nf4["device"] == "cuda" and nf4["breakdown"]["framework_mib"] == 0


def test_sparse_state_scales_with_nnz_and_optimizer():
    base = dict(model="random:tiny-llama", method="random", density=0.01)
    sgd = estimate_cell(CellConfig(**base))
    adam = estimate_cell(CellConfig(**base, optimizer="adam"))
    nnz = sgd["trainable_numel"]
    assert nnz == round(0.01 * sgd["linear_numel"])
    assert sgd["breakdown"]["trainable_mib"] == pytest.approx(nnz * 12 / 2**20, abs=1e-3)  # int64 index + fp32
    assert adam["breakdown"]["optimizer_mib"] == pytest.approx(nnz * 8 / 2**20, abs=1e-3)
    assert sgd["breakdown"]["optimizer_mib"] == 0


def test_options_and_length_scale_activations():
    two = estimate_cell(CellConfig(model="smollm2", method="forward", task="sst2"))
    three = estimate_cell(CellConfig(model="smollm2", method="forward", task="cb"))  # Yes / No / Maybe
    longer = estimate_cell(CellConfig(model="smollm2", method="forward", task="sst2", max_length=512))
    assert three["breakdown"]["activations_mib"] == pytest.approx(1.5 * two["breakdown"]["activations_mib"], rel=0.1)
    assert longer["breakdown"]["activations_mib"] > 2 * two["breakdown"]["activations_mib"]


def test_architecture_comes_from_the_fallback_without_network():
    est = estimate_cell(CellConfig(**LLAMA7B, method="forward"))
    assert est["architecture_from"] == "random:llama-2-7b"
    with pytest.raises(UserError, match="no config to estimate from"):
        estimate_cell(CellConfig(model="no-such-org/no-such-model", method="forward"))


def test_full_zo_on_quantized_weights_is_unsupported():
    from zobench.errors import Unsupported

    with pytest.raises(Unsupported, match="unsupported"):
        estimate_cell(CellConfig(**LLAMA7B, method="full", quant="nf4"))


def test_record_estimate_never_raises():
    bad = record_estimate({"model": "random:no-such-config", "method": "forward"})
    assert set(bad) == {"error"} and "no-such-config" in bad["error"]
    assert set(record_estimate({"model": "random:tiny-llama", "method": "forward"})) == {"peak_mib", "breakdown"}
    assert "error" in record_estimate({"model": "random:tiny-llama", "method": "fo-sgd"})


def test_make_record_keeps_a_failed_estimate_as_an_error():
    from zobench.launcher import Outcome, make_record
    from zobench.matrix import expand
    from zobench.suite import parse_suite

    suite = parse_suite({"name": "s", "reference": False,
                         "defaults": {"model": "random:no-such-config", "method": "forward"}}, "s.yaml")
    (cell,) = expand(suite)
    rec = make_record(suite, cell, Outcome("failed", reason="boom"), "", 0.0, {}, {})
    assert rec["status"] == "failed" and "error" in rec["estimate"]


def test_shipped_smollm2_config_is_the_embedded_models():
    from zobench.models import load_model
    from zobench.models.load import _random_config

    real = load_model("smollm2").model.config
    shipped = _random_config("smollm2-135m", False)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "model_type",
                "hidden_act", "max_position_embeddings", "rope_parameters"):
        assert getattr(shipped, key) == getattr(real, key), key


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "zobench.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_estimate_cli_table_and_json(capsys, monkeypatch):
    from zobench.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["estimate", "suites/smoke.yaml"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["cell", "device", "peak", "MiB"]
    assert len(lines) == 5 and all("weights" in line for line in lines[1:])
    assert main(["estimate", "suites/smoke.yaml", "--json", "--only", "method=sensitive"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["labels"]["method"] for row in rows] == ["sensitive"]
    assert rows[0]["peak_mib"] > 0 and "activations_mib" in rows[0]["breakdown"]


def test_estimate_cli_bad_suite_is_one_line():
    r = subprocess.run([sys.executable, "-m", "zobench.cli", "estimate", "no/such/suite.yaml"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
