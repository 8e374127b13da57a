"""Keeping what was trained: saved deltas reload onto their base exactly, and nowhere else."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import zobench

from zobench.cell.pipeline import Pipeline
from zobench.errors import UserError
from zobench.spec.config import CellConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="random:tiny-llama", task="sst2", n_train=16, n_dev=0, n_test=0, batch_size=4, max_length=32,
            steps=3, warmup_steps=1, eval_before=False, eval_after=False, device="cpu", density=0.05)


def weights(pipeline) -> dict[str, torch.Tensor]:
    """Every parameter by name (a PEFT-wrapped model's names without the wrapper's prefix)."""
    return {n.removeprefix("base_model.model."): p.detach().clone()
            for n, p in pipeline.run_state.model.named_parameters()}


def reload(delta: Path, **settings) -> Pipeline:
    """A run of no steps from the delta, on the settings it was trained with (what `zobench eval` does)."""
    meta = json.loads((delta / "delta.json").read_text())
    cfg = {k: v for k, v in meta["config"].items() if k not in ("save", "delta")}
    cfg.update(steps=0, warmup_steps=0, eval_after=False, delta=str(delta), **settings)
    p = Pipeline(CellConfig.from_dict(cfg))
    p.run()
    return p


@pytest.mark.parametrize("method, extra, kind", [
    ("random", {"lr": 1e-2}, "sparse"),
    ("full", {"lr": 1e-3}, "trajectory"),
    ("lezo", {"lr": 1e-3, "optimizer": "momentum"}, "trajectory"),
    ("lora", {"lr": 1e-2, "optimizer": "sgd"}, "lora"),
    ("fo-sgd", {"lr": 1e-2}, "tensors"),
])
def test_a_saved_result_reloads_to_the_trained_weights(tmp_path, method, extra, kind):
    trained = Pipeline(CellConfig.from_dict(dict(TINY, method=method, save=str(tmp_path / "d"), **extra)))
    rec = trained.run()
    assert rec.artifact["kind"] == kind and rec.artifact["step"] == 3 and rec.artifact["bytes"] > 0
    umask = os.umask(0o022)
    os.umask(umask)
    # built in a temporary folder, yet it has the permissions a folder made in place would have (not 0700)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
    before = weights(trained)
    base = Pipeline(CellConfig.from_dict(dict(TINY, method=method, steps=0, **extra)))
    base.run()
    again = reload(tmp_path / "d")
    after, untrained = weights(again), weights(base)
    names = [n for n in before if n in after]
    assert names and all(torch.equal(before[n], after[n]) for n in names), kind
    # it did train: weights moved, or (LoRA, whose base stays) the adapter's B left its zero start
    assert any(not torch.equal(untrained[n], after[n]) for n in names if n in untrained) or \
        any(after[n].abs().sum() > 0 for n in names if "lora_B" in n)


def test_a_trajectory_saved_before_the_generator_setting_replays_with_torchs_generator(tmp_path):
    trained = Pipeline(CellConfig.from_dict(dict(TINY, method="full", lr=1e-3, generator="torch",
                                                 save=str(tmp_path / "d"))))
    trained.run()
    path = tmp_path / "d" / "delta.json"
    meta = json.loads(path.read_text())
    del meta["config"]["generator"]  # as written before the setting existed
    path.write_text(json.dumps(meta))
    before, after = weights(trained), weights(reload(tmp_path / "d"))
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_delta_on_another_base_is_refused_in_one_line(tmp_path):
    Pipeline(CellConfig.from_dict(dict(TINY, method="random", save=str(tmp_path / "d")))).run()
    with pytest.raises(UserError, match="trained from another base model") as e:
        reload(tmp_path / "d", seed=1)  # seed 1: other random weights
    assert "\n" not in str(e.value)
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="delta description not found"):
        reload_dir = tmp_path / "x"
        Pipeline(CellConfig.from_dict(dict(TINY, method="random", delta=str(reload_dir)))).run()


@pytest.mark.slow
@pytest.mark.parametrize("quant, method, lr", [("none", "sensitive", 1e-3), ("nf4", "sensitive", 1e-3),
                                               ("none", "full", 1e-5)])
def test_smollm2_saved_reloaded_and_evaluated_scores_as_at_the_end_of_training(tmp_path, quant, method, lr):
    cfg = dict(model="smollm2", task="sst2", method=method, quant=quant, density=1e-3, lr=lr, n_train=32, n_dev=0,
               n_test=48, batch_size=8, max_length=64, steps=3, warmup_steps=1, eval_before=False,
               calib_sequences=2, calib_length=64, device="cpu", save=str(tmp_path / "d"))
    rec = Pipeline(CellConfig.from_dict(cfg)).run()
    again = reload(tmp_path / "d", eval_before=True)
    assert again.metrics.get("test_before") == rec.metrics.get("test_after")
    if quant == "nf4":
        assert rec.artifact["bytes"] < 1.2 * 2**20  # 106k int32 indices and float32 values: ~0.85 MB, not the model


def test_train_save_then_eval_from_the_command_line(tmp_path):
    cli = zobench  # the commands' main in this process (tests/test_cli_imports.py runs fresh interpreters)
    r = cli("train", "--model", "random:tiny-llama", "--method", "random", "--density", "0.05", "--steps", "2",
            "--set", "n_test=0", "--set", "n_dev=0", "--set", "n_train=8", "--set", "batch_size=4",
            "--save", tmp_path / "kept", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "saved:  " in r.stdout and (tmp_path / "kept" / "delta.safetensors").is_file()
    r = cli("eval", "--delta", tmp_path / "kept", "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "eval" / "record.json").read_text())
    assert rec["metrics"]["delta"]["kind"] == "sparse" and rec["metrics"]["steps_done"] == 0
    assert "method=random delta_step=2" in r.stdout and "steps=0" not in r.stdout  # the delta's step, not eval's
    r = cli("eval", "--delta", tmp_path / "nothing-here", "--out", tmp_path / "e2")
    assert r.returncode == 2 and "nothing-here: not found" in r.stderr
    r = cli("eval", "--delta", tmp_path / "kept", "--out", tmp_path / "eval")  # its own record: replaced
    assert r.returncode == 0, r.stderr
    r = cli("eval", "--delta", tmp_path / "kept", "--out", tmp_path / "eval", "--set", "steps=5")
    assert r.returncode == 2 and "--set steps: eval evaluates the saved result as it is" in r.stderr
    # a record.json or predictions.npz that zobench did not write there is refused before any work, and kept
    for n, (name, needle) in enumerate((("record.json", "is not a record zobench wrote"),
                                        ("predictions.npz", "is not the predictions of a record zobench wrote"))):
        mine = tmp_path / f"mine-{n}"
        mine.mkdir()
        (mine / name).write_text("mine")
        r = cli("eval", "--delta", tmp_path / "kept", "--out", mine)
        assert r.returncode == 2 and needle in r.stderr and (mine / name).read_text() == "mine", r.stderr
        assert "--delta" not in r.stderr  # the --out is wrong, not the delta


def test_a_single_run_records_its_processs_allocator_and_refuses_the_other(tmp_path, monkeypatch):
    """``zobench train`` runs in its own process, whose allocator was fixed at start: the record says which
    (``malloc``), asking for the other is one line and exit 2, and a kept result evaluates under either."""
    cli = zobench
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    tiny = ["--model", "random:tiny-llama", "--method", "random", "--density", "0.05", "--steps", "1",
            "--set", "n_test=0", "--set", "n_dev=0", "--set", "n_train=8", "--set", "batch_size=4"]
    r = cli("train", *tiny, "--save", tmp_path / "kept", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "record.json").read_text())["config"]["malloc"] == "glibc"
    r = cli("train", *tiny, "--set", "malloc=release", "--out", tmp_path / "refused")
    assert r.returncode == 2 and "malloc=release" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # a process started under release
    r = cli("eval", "--delta", tmp_path / "kept", "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "eval" / "record.json").read_text())["config"]["malloc"] == "release"
