"""Shape warm-up (CellConfig.shape_warmup, cell.timing.warm_shapes): before the first step, one forward at
each batch shape the steps will use, so that no timed step is a model's first forward at its shape; the
training itself is the same with it or without it."""

from __future__ import annotations

import pytest
import torch

from zobench.cell.pipeline import Pipeline
from zobench.errors import UserError
from zobench.spec.config import CellConfig
from zobench.spec.matrix import cell_id

# SST-2 sentences padded to each batch's longest: the batches' widths vary from step to step.
TINY = {"model": "random:tiny-llama", "task": "sst2", "method": "random", "density": 0.01, "lr": 1e-3,
        "n_train": 32, "n_dev": 0, "n_test": 0, "eval_before": False, "eval_after": False, "batch_size": 4,
        "max_length": 64, "steps": 6, "warmup_steps": 1, "device": "cpu"}


def forwards(warmup: str) -> tuple[list, object]:
    """Run the tiny cell; returns the input shape of every forward of the model, in order, and the record."""
    shapes = []

    def see(module, args):
        if isinstance(module, torch.nn.Embedding):
            shapes.append(tuple(args[0].shape))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(see)
    try:
        record = Pipeline(CellConfig.from_dict(dict(TINY, shape_warmup=warmup))).run()
    finally:
        hook.remove()
    assert record.status == "ok", record.error
    return shapes, record


def first_seen_at(shapes: list) -> list[int]:
    """The position of each shape's first forward."""
    firsts: dict = {}
    for i, s in enumerate(shapes):
        firsts.setdefault(s, i)
    return sorted(firsts.values())


def test_every_shape_the_steps_use_gets_its_first_forward_before_the_first_step():
    warmed, rec = forwards("always")
    plain, _ = forwards("never")
    distinct = len(set(plain))
    assert distinct > 2  # the batches differ in width, else there is nothing to warm
    assert rec.metrics.get("shape_warmup")["shapes"] == distinct
    assert first_seen_at(warmed) == list(range(distinct))  # the first forwards are the distinct shapes
    assert len(warmed) == len(plain) + distinct
    # without it, new shapes keep arriving in the steps (what a timed step then pays for)
    assert first_seen_at(plain)[-1] > distinct


def test_the_warm_up_changes_no_step():
    _, warmed = forwards("always")
    _, plain = forwards("never")
    assert warmed.metrics.get("loss_curve") == plain.metrics.get("loss_curve")
    assert warmed.metrics.get("trajectory") == plain.metrics.get("trajectory")


def test_auto_warms_on_cuda_only_and_keeps_cell_ids():
    shapes, rec = forwards("auto")  # a CPU cell: records made before the setting stay comparable
    assert rec.metrics.get("shape_warmup") is None
    base = CellConfig.from_dict(TINY)
    assert cell_id(base) == cell_id(CellConfig.from_dict(dict(TINY, shape_warmup="auto")))
    assert cell_id(base) != cell_id(CellConfig.from_dict(dict(TINY, shape_warmup="always")))


def test_an_unknown_setting_is_one_clear_error():
    with pytest.raises(UserError, match="key 'shape_warmup' = 'sometimes': expected one of auto, always, never"):
        CellConfig.from_dict(dict(TINY, shape_warmup="sometimes"))


def test_the_report_says_how_many_shapes_were_warmed(tmp_path):
    from zobench.report import render_results_file
    from zobench.results import append_record

    _, rec = forwards("always")
    rec.cell_id = "warmed"
    path = tmp_path / "r.jsonl"
    append_record(path, rec)
    text = render_results_file(path, tmp_path / "r.md").read_text()
    w = rec.metrics.get("shape_warmup")
    assert f"{w['shapes']} in {w['seconds']:.2f} s" in text and "Shapes warmed" in text
    rec.metrics.set(shape_warmup={"shapes": "many", "seconds": None})  # a record is data: never an error
    append_record(path, rec)
    assert "Shapes warmed" in render_results_file(path, tmp_path / "r.md").read_text()
