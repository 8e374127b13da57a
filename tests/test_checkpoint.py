"""Mid-cell checkpoints (zobench.cell.checkpoint): a ZO cell killed part-way goes on from its last
checkpoint and ends bit for bit where the uninterrupted run ends; a checkpoint of another cell is not used;
a suite run keeps them only for --resume and drops a cell's once its record is written."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from zobench.cell import checkpoint
from zobench.cell.pipeline import Pipeline
from zobench.measure.env import this_machine
from zobench.spec.config import CellConfig

# The embedded model: a random-weight one is never evaluated (accuracy_meaningful), and dev scores and the
# best dev step are part of what a checkpoint must carry.
TINY = {"model": "smollm2", "task": "sst2", "n_train": 16, "n_dev": 8, "n_test": 8, "batch_size": 4,
        "max_length": 32, "steps": 7, "warmup_steps": 1, "eval_every": 2, "eval_before": True, "eval_after": True,
        "calib_sequences": 2, "calib_length": 32, "density": 0.01, "device": "cpu"}


class Killed(Exception):
    pass


def run_killed_at(cfg: CellConfig, step: int, monkeypatch) -> None:
    """Run ``cfg`` in this process and stop it as a kill would, before step ``step`` (0-based): right after
    the books of step ``step - 1`` (its checkpoint included)."""
    original = Pipeline.after_step

    def books_then_die(self, stepper, batch, res, i, *args):
        original(self, stepper, batch, res, i, *args)
        if i == step - 1:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(Pipeline, "after_step", books_then_die)
        with pytest.raises(Killed):
            Pipeline(cfg).run()


# random in CI (the sparse path); full and lezo (dense replays, minutes each on 2 cores) in `make test-all`
@pytest.mark.parametrize("method, lr", [("random", 1e-2), pytest.param("full", 1e-4, marks=pytest.mark.slow),
                                        pytest.param("lezo", 1e-4, marks=pytest.mark.slow)])
def test_a_killed_cell_resumes_from_its_checkpoint_bit_for_bit(method, lr, tmp_path, monkeypatch):
    cfg = CellConfig.from_dict(dict(TINY, method=method, lr=lr))
    whole = Pipeline(cfg).run()

    resumable = dataclasses.replace(cfg, checkpoint=str(tmp_path / "c.json"))
    run_killed_at(resumable, 5, monkeypatch)  # steps 0-4 ran; the checkpoint is the one after step 4
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["step"] == 4 and len(saved["trajectory"]) == 4 and saved["test_before"] is not None
    assert saved["spent"]["wall_s"] > 0 and saved["spent"]["cpu_s"] > 0  # what the killed segment cost so far
    assert saved["machines"] == [this_machine()] and os.cpu_count() is not None  # and where it ran
    assert f"({os.cpu_count()} cores)" in saved["machines"][0]

    resumed = Pipeline(resumable).run()
    m, w = resumed.metrics, whole.metrics
    assert m.get("resumed_from_step") == 4 and m.get("segments") == 2
    assert "eval_before" not in resumed.phases  # the score before training came from the checkpoint
    # the cost counts both segments: the killed one up to its checkpoint, and this one
    assert m.get("earlier_segments") == saved["spent"]
    assert m.get("segment_machines") == [*saved["machines"], this_machine()]  # every segment's, this one last
    this_run = sum(p.cpu_s for p in resumed.phases.values())
    assert resumed.cpu_s == pytest.approx(this_run + saved["spent"]["cpu_s"]) and this_run > 0
    for key in ("loss_curve", "trajectory", "test_before", "test_after", "test_best", "best_step", "best_dev"):
        assert m.get(key) == w.get(key), key
    assert [(p["step"], p["accuracy"]) for p in m.get("dev_curve")] == \
           [(p["step"], p["accuracy"]) for p in w.get("dev_curve")]
    assert m.step_s.n == w.step_s.n == 6  # the warm-up step is untimed in both
    assert m.step_over_ref.n == w.step_over_ref.n == 6  # the pairs before the kill came back from the checkpoint


def test_a_resumed_cell_takes_back_only_the_predictions_its_checkpoint_names(tmp_path, monkeypatch):
    """The checkpoint names the predictions file's sha256 (written just before it): a resumed cell takes the
    earlier evaluations' per-example predictions back only from those bytes; other bytes there (copied
    from elsewhere, or from a later kill) are not vouched for by the new record, and it says so."""
    import hashlib

    import numpy as np

    from zobench.cell.predictions import read

    for tamper in (False, True):
        folder = tmp_path / str(tamper)
        cfg = CellConfig.from_dict(dict(TINY, method="random", lr=1e-2, checkpoint=str(folder / "c.json"),
                                        predictions=str(folder / "p.npz")))
        run_killed_at(cfg, 5, monkeypatch)
        saved = json.loads((folder / "c.json").read_text())
        assert saved["predictions_sha256"] == hashlib.sha256((folder / "p.npz").read_bytes()).hexdigest()
        if tamper:
            kept = read(folder / "p.npz")
            np.savez(folder / "p.npz", **{f"{n}.{k}": v[::-1] for n, f in kept.items() for k, v in f.items()})
        rec = Pipeline(cfg).run()
        entries = set(read(folder / "p.npz"))
        warned = any("not the one it names" in w for w in rec.warnings)
        assert warned == tamper
        assert ({"test_before", "dev_2", "dev_4"} <= entries) != tamper and {"dev_6", "test_after"} <= entries


# Where nothing is evaluated, a random-weight model does (checkpoints are due by step, not by evaluation).
FAST = dict(TINY, model="random:tiny-llama")


def test_a_checkpoint_of_another_cell_is_not_used(tmp_path):
    from zobench.spec.matrix import cell_id

    path = tmp_path / "c.json"
    mine = CellConfig.from_dict(dict(FAST, method="random", lr=1e-2, checkpoint=str(path)))
    checkpoint.save(path, checkpoint.Checkpoint(cell_id=cell_id(dataclasses.replace(mine, lr=3e-2)), config={},
                                                step=4, losses=[1.0] * 4, trajectory=[[[1, 0.5]]] * 4))
    other = Pipeline(mine).run()
    assert other.metrics.get("resumed_from_step") is None and len(other.metrics.get("loss_curve")) == 7
    assert other.metrics.get("loss_curve")[:4] != [1.0] * 4
    assert any(str(path) in w and "ran from step 0" in w for w in other.warnings)


def test_checkpoints_are_written_atomically_and_only_when_due(tmp_path):
    assert [s for s in range(1, 8) if checkpoint.due(s, 7, 2)] == [2, 4, 6]
    assert [s for s in range(1, 301) if checkpoint.due(s, 300, 0)] == [100, 200]
    path = tmp_path / "c.json"
    checkpoint.save(path, checkpoint.Checkpoint(cell_id="abc", config={}, step=2, trajectory=[[[1, 0.5]]] * 2))
    assert not path.with_suffix(".tmp").exists()
    assert checkpoint.load(path, "abc")[0].step == 2
    # a checkpoint is data too: a trajectory shorter than its step, or a coefficient that is not finite,
    # would replay into wrong weights without a word
    for bad in ({"step": 3}, {"trajectory": [[[1, "NaN"]]] * 2}, {"step": -1}, {"spent": {"wall_s": -1, "cpu_s": 0}},
                {"spent": {"wall_s": "1", "cpu_s": 0}}, {"spent": {"cpu_s": 1}}, {"spent": [1, 2]},
                # the books a resumed cell takes back as they are: refused here, not mid-cell
                {"losses": [1.0] * 3}, {"losses": [1.0, None]}, {"dev_curve": [{"step": "x"}]},
                {"dev_curve": [{"step": 2, "accuracy": "x"}]}, {"dev_curve": 5}, {"best_step": 3},
                {"segments": 0}, {"parts": {"perturb": [None]}}, {"parts": []}, {"tokens": [1.5]},
                {"best_scores": {"accuracy": [1]}}, {"test_before": "x"}, {"total": -1}, {"seconds": [float("inf")]},
                {"config": []}, {"machines": ["a", "b"]}, {"machines": [1]}, {"machines": "a"},
                {"machines": ["a\nb"]}, {"machines": ["x" * 161]}):
        checkpoint.save(path, checkpoint.Checkpoint(**dict(dict(cell_id="abc", config={}, step=2,
                                                                trajectory=[[[1, 0.5]]] * 2), **bad)))
        ckpt, why = checkpoint.load(path, "abc")
        assert ckpt is None and "unreadable" in why, bad
    path.write_text("{not json")
    ckpt, why = checkpoint.load(path, "abc")
    assert ckpt is None and "unreadable" in why
    # links planted where the checkpoint and where its old fixed temporary name (c.tmp) go are not written
    # through: the new file replaces the link itself
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not zobench's")
    path.unlink()
    path.symlink_to(elsewhere)
    path.with_suffix(".tmp").symlink_to(elsewhere)
    checkpoint.save(path, checkpoint.Checkpoint(cell_id="abc", config={}, step=2, trajectory=[[[1, 0.5]]] * 2))
    assert elsewhere.read_text() == "not zobench's"
    assert not path.is_symlink() and checkpoint.load(path, "abc")[0].step == 2


def test_a_suite_resumes_a_killed_cell_and_drops_its_checkpoint_once_recorded(tmp_path, monkeypatch):
    from zobench.driver import run_suite, select_cells
    from zobench.results import load_records
    from zobench.spec.suite import parse_suite

    suite = parse_suite({"name": "ck", "reference": False, "defaults": dict(FAST, method="random", lr=1e-2)},
                        "ck.yaml")
    (cell,) = select_cells(suite)
    path = tmp_path / "ck.checkpoints" / f"{cell.cell_id}.json"
    run_killed_at(dataclasses.replace(cell.config, checkpoint=str(path)), 5, monkeypatch)
    first_losses = json.loads(path.read_text())["losses"]

    rec = load_records(run_suite(suite, tmp_path, resume=True))[-1]
    assert rec.ok and rec.metrics.get("resumed_from_step") == 4
    # the machine time counts the killed segment (up to its checkpoint) beside this run's wall clock
    assert rec.machine_s == pytest.approx(rec.wall_s + rec.metrics.get("earlier_segments")["wall_s"])
    assert rec.metrics.get("earlier_segments")["wall_s"] > 0
    assert rec.metrics.get("loss_curve")[:4] == first_losses and len(rec.metrics.get("loss_curve")) == 7
    assert "checkpoint" not in rec.config and not path.exists()

    # A fresh run (no --resume) starts from step 0 even where a checkpoint was left behind.
    run_killed_at(dataclasses.replace(cell.config, checkpoint=str(path)), 5, monkeypatch)
    fresh = load_records(run_suite(suite, tmp_path))[-1]
    assert fresh.ok and fresh.metrics.get("resumed_from_step") is None
    # ... and the resumed cell ended where this uninterrupted one did.
    assert rec.metrics.get("trajectory") == fresh.metrics.get("trajectory")
