"""Microbenchmarks of the hot pieces (pytest-benchmark).

`make bench` runs them with timing; `make test` runs them once each with --benchmark-disable, as
correctness passes (every benchmark also checks its result). Compare rows of one run only.
"""

from __future__ import annotations

import pytest
import torch

from zobench.zo import masks as M
from zobench.zo.directions import draw, make_generator
from zobench.zo.optim import make_optimizer
from zobench.zo.trainable import DenseTrainable, SparseTrainable

N = 4 * 1024 * 1024  # one 4M-value weight matrix (2048 x 2048)


@pytest.fixture()
def weight():
    return [("w", torch.nn.Parameter(torch.randn(2048, 2048) * 0.02, requires_grad=False))]


@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
def test_draw_z(benchmark, direction):
    z = benchmark(lambda: draw(N, make_generator(0), direction))
    assert z.numel() == N and abs(float(z.float().pow(2).mean()) - 1) < 0.01


@pytest.mark.parametrize("kind", ["dense", "sparse-0.1%"])
def test_perturbation_pass(benchmark, weight, kind):
    mask = M.random_mask(weight, 1e-3)
    t = DenseTrainable(weight) if kind == "dense" else SparseTrainable(weight, mask)
    w, before = weight[0][1], weight[0][1].detach().clone()
    t.apply(1, 1e-3)  # the pass moves every trained value, and only those
    moved = (w != before).reshape(-1).nonzero().reshape(-1)
    assert torch.equal(moved, torch.arange(w.numel()) if kind == "dense" else mask["w"].sort().values)
    t.restore()
    benchmark(lambda: (t.apply(1, 1e-3), t.apply(1, -1e-3)))
    t.restore()
    if kind == "dense":  # in place: back within rounding of eps
        assert float((w - before).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(before.abs().max())
    else:
        assert torch.equal(w, before)  # sparse restores exactly


def test_sparse_update(benchmark, weight):
    mask = M.random_mask(weight, 1e-3)
    t = SparseTrainable(weight, mask)
    opt = make_optimizer("sgd", 1e-2)
    before = weight[0][1].detach().clone()
    benchmark(lambda: t.update([(3, 0.5)], opt, 0))
    diff = (weight[0][1] != before).reshape(-1).nonzero().squeeze(1)
    assert set(diff.tolist()) <= set(mask["w"].tolist()) and diff.numel() > 0


def test_forward_tiny(benchmark):
    from zobench.models import load_model
    from zobench.zo.mask_build import lm_loss

    model = load_model("random:tiny-llama").model
    batch = torch.randint(0, 49152, (16, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        loss = benchmark(lambda: float(lm_loss(model, batch)))
    assert 9 < loss < 12  # ~ln(49152) for random weights
