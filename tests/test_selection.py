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


def test_a_cell_with_dev_evaluation_reports_test_at_its_best_dev_step():
    """The embedded model on SST-2: dev every 2 steps, test at the best dev step beside the last step."""
    cfg = CellConfig.from_dict(dict(TINY, model="smollm2", method="sensitive", density=1e-3, lr=1e-3, n_dev=16,
                                    n_test=16, steps=4, eval_every=2, eval_after=True, calib_sequences=2,
                                    calib_length=64, max_length=64))
    rec = Pipeline(cfg).run()
    m = rec.metrics
    curve = m.get("dev_curve")
    assert [p["step"] for p in curve] == [2, 4] and all(p["train_s"] > 0 for p in curve)
    assert curve[0]["train_s"] < curve[1]["train_s"]
    best = max(curve, key=lambda p: (p["accuracy"], -p["step"]))
    assert m.get("best_step") == best["step"] and m.get("best_dev")["accuracy"] == best["accuracy"]
    assert m.get("test_best") is not None and "accuracy" in m.get("test_best")
    if best["step"] == 4:
        assert m.get("test_best") == m.get("test_after")
