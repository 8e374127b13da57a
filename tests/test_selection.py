"""Selecting as MeZO does: dev curves, test at the best dev step, and full ZO rebuilt from its trajectory."""

from __future__ import annotations

import pytest
import torch

from zobench.cell.pipeline import DevSelection, Pipeline
from zobench.spec.config import CellConfig

TINY = dict(model="random:tiny-llama", task="sst2", n_train=16, n_dev=0, n_test=0, batch_size=4, max_length=32,
            steps=5, warmup_steps=1, eval_before=False, eval_after=False, lr=1e-3, eps=1e-3, device="cpu")


@pytest.mark.parametrize("method, extra", [("full", {}), ("lezo", {"layer_fraction": 0.5}),
                                           ("full", {"optimizer": "momentum"})])
def test_the_trajectory_rebuilds_the_trained_weights_bit_for_bit(method, extra):
    pipeline = Pipeline(CellConfig.from_dict(dict(TINY, method=method, **extra)))
    rec = pipeline.run()
    trained = {n: p.detach().clone() for n, p in pipeline.run_state.model.named_parameters()}
    assert len(rec.metrics.get("trajectory")) == rec.metrics.get("steps_done") == 5
    at_end = pipeline.rebuild(5)
    rebuilt = dict(at_end.model.named_parameters())
    assert all(torch.equal(trained[n], rebuilt[n]) for n in trained)
    # A step earlier is another model: the trajectory really moved the weights.
    earlier = Pipeline(CellConfig.from_dict(dict(TINY, method=method, **extra)))
    earlier.run()
    mid = dict(earlier.rebuild(3).model.named_parameters())
    assert any(not torch.equal(trained[n], mid[n]) for n in trained)


def test_dev_selection_keeps_the_best_step_and_the_sparse_values_of_it():
    from zobench.zo.trainable import SparseTrainable

    w = torch.nn.Parameter(torch.zeros(10))
    t = SparseTrainable([("w", w)], {"w": torch.tensor([1, 3, 5])})
    sel = DevSelection(t)
    t.master.fill_(1.0)
    sel.see(10, {"accuracy": 0.6})
    t.master.fill_(2.0)
    sel.see(20, {"accuracy": 0.6})   # a tie is not better: the earlier step stays
    sel.see(30, {"accuracy": 0.5})
    assert sel.best_step == 10 and sel.best == {"accuracy": 0.6}
    t.load(sel.values)
    assert w[[1, 3, 5]].tolist() == [1.0, 1.0, 1.0] and w[0] == 0


def test_a_cell_with_dev_evaluation_reports_test_at_its_best_dev_step(monkeypatch):
    """The embedded model on SST-2, dev every 2 steps, its dev scores scripted so that the best step (2) is
    not the last (4): the test score at the best step is the model's with step 2's sparse values, not the
    last step's."""
    from zobench.cell.pipeline import Run

    dev_scores, at_dev = iter([0.9, 0.5]), []
    real = Run.evaluate

    def evaluate(self, examples, details=None):
        if examples is self.splits.dev:
            at_dev.append(pipeline.trainable.master.clone())
            return {"accuracy": next(dev_scores)}
        return real(self, examples, details)

    monkeypatch.setattr(Run, "evaluate", evaluate)
    cfg = CellConfig.from_dict(dict(TINY, model="smollm2", method="sensitive", density=1e-3, lr=1e-3, n_dev=16,
                                    n_test=16, steps=4, eval_every=2, eval_after=True, calib_sequences=2,
                                    calib_length=64, max_length=64))
    pipeline = Pipeline(cfg)
    rec = pipeline.run()
    m = rec.metrics
    # the dev evaluations are a phase of their own, out of the training's peak (a forward cell has none)
    assert rec.phases["eval_dev"].wall_s > 0 and {"warmup", "train"} <= set(rec.phases)
    curve = m.get("dev_curve")
    assert [p["step"] for p in curve] == [2, 4] and all(p["train_s"] > 0 for p in curve)
    assert curve[0]["train_s"] < curve[1]["train_s"]
    assert m.get("best_step") == 2 and m.get("best_dev") == {"accuracy": 0.9} and m.get("best_weights") == "kept"
    assert not torch.equal(at_dev[0], at_dev[1])        # steps 3-4 moved the values ...
    assert torch.equal(pipeline.trainable.master, at_dev[0])  # ... and the test at the best step had step 2's
    assert real(pipeline.run_state, pipeline.run_state.splits.test) == m.get("test_best")


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)])
def test_dense_weights_written_to_disk_come_back_bit_for_bit(dtype, master):
    import tempfile

    from zobench.zo.optim import make_optimizer
    from zobench.zo.trainable import DenseTrainable

    torch.manual_seed(0)
    params = [(f"w{i}", torch.nn.Parameter(torch.randn(shape).to(dtype))) for i, shape in
              enumerate([(7, 5), (3,), (2, 3, 4)])]
    t = DenseTrainable(params, master=master)
    opt = make_optimizer("sgd", lr=1e-2)
    t.apply(11, 1e-3)
    t.update([(11, 0.5)], opt, 0)
    saved = [p.detach().clone() for _, p in params]
    masters = [m.clone() for m in t.masters] if master else None
    with tempfile.TemporaryFile() as f:
        t.save_raw(f)
        assert f.tell() == t.nbytes == sum(x.numel() * (4 if master else x.element_size()) for x in saved)
        t.apply(12, 1e-3)
        t.update([(12, 5.0)], opt, 1)   # the weights move on after the best step ...
        assert any(not torch.equal(p.detach(), s) for (_, p), s in zip(params, saved))
        t.load_raw(f)                   # ... and come back from the file exactly
    assert all(torch.equal(p.detach(), s) for (_, p), s in zip(params, saved))
    if master:
        assert all(torch.equal(m, s) for m, s in zip(t.masters, masters))


@pytest.mark.parametrize("method, extra", [("full", {}), pytest.param("lezo", {"layer_fraction": 0.5},
                                                                      marks=pytest.mark.slow)])  # CI: full's
def test_dense_zo_tests_its_best_dev_step_with_weights_kept_on_disk_equal_to_the_replay(method, extra,
                                                                                        monkeypatch):
    """Dev scores scripted so that the best dev step (2) is not the last (6): the test at the best step
    runs on weights read back from disk, the same bit for bit as replaying the trajectory to step 2."""
    from zobench.cell.pipeline import Run

    dev_scores = iter([0.9, 0.5, 0.5])
    real = Run.evaluate

    def evaluate(self, examples, details=None):
        if examples is self.splits.dev:
            return {"accuracy": next(dev_scores)}
        return real(self, examples, details)

    monkeypatch.setattr(Run, "evaluate", evaluate)
    cfg = CellConfig.from_dict(dict(TINY, model="smollm2", method=method, lr=1e-4, n_dev=4, n_test=8, steps=6,
                                    eval_every=2, eval_after=True, batch_size=2, **extra))
    pipeline = Pipeline(cfg)
    m = pipeline.run().metrics
    assert m.get("best_step") == 2 and m.get("best_weights") == "disk" and m.get("test_best") is not None
    from_disk = {n: p.detach().clone() for n, p in pipeline.run_state.model.named_parameters()}
    replayed = pipeline.rebuild(2)
    assert all(torch.equal(from_disk[n], p) for n, p in replayed.model.named_parameters())
    assert real(replayed, replayed.splits.test) == m.get("test_best")
    last = pipeline.rebuild(6).model.named_parameters()
    assert any(not torch.equal(from_disk[n], p) for n, p in last)  # step 2 is not the last step's weights
