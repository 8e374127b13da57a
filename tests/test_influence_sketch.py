"""RapidGrad sketch: the Feistel map is a bijection, the sketch matches its definition, dots are unbiased."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zobench.errors import UserError
from zobench.influence import sketch as sketch_mod
from zobench.influence.sketch import SketchConfig, Sketcher, nest

M31 = 0x7FFFFFFF


def py_mix(x: int, key: int) -> int:
    x = ((x ^ key) * 0x45D9F3B) & M31
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & M31
    return x ^ (x >> 16)


def py_perm(sk: Sketcher, j: int) -> int:
    """The definition with Python integers (no overflow possible): Feistel rounds, cycle-walk into [0, D)."""
    h, m = sk._h, (1 << sk._h) - 1
    while True:
        left, right = j >> h, j & m
        for key in sk._round_keys:
            left, right = right, left ^ (py_mix(right, key) & m)
        j = (left << h) | right
        if j < sk.dim:
            return j


def py_sign(sk: Sketcher, j: int) -> int:
    k_lo, k_hi = sk._sign_keys
    return 1 if (py_mix(py_mix(j & M31, k_lo) ^ (j >> 31), k_hi) >> 11) & 1 else -1


def py_sketch(sk: Sketcher, x: list[float]) -> list[float]:
    """Permute (with signs), then sum K contiguous balanced bins: bin b holds positions [ceil(bD/K), ceil((b+1)D/K))."""
    d, k = sk.dim, sk.k
    permuted = [0.0] * d
    for j, v in enumerate(x):
        permuted[py_perm(sk, j)] = py_sign(sk, j) * v
    return [sum(permuted[-(-b * d // k): -(-(b + 1) * d // k)]) for b in range(k)]


@pytest.mark.parametrize("d", [1, 2, 3, 97, 1000, 1024, 2048, 4099])
def test_permutation_is_a_bijection_on_0_d(d):
    sk = Sketcher(SketchConfig(dim=d, k=1, seed=d))
    pos = sk.perm(torch.arange(d))
    assert torch.equal(pos.sort().values, torch.arange(d))
    if d >= 97:
        assert not torch.equal(pos, torch.arange(d))  # it does move things
        other = Sketcher(SketchConfig(dim=d, k=1, seed=d + 1)).perm(torch.arange(d))
        assert not torch.equal(pos, other)  # and the seed matters


def test_int64_path_matches_python_integers_at_huge_indices():
    # dim * k just below 2^62: any int64 overflow in the hash, the walk or pos * k would show here.
    d = (1 << 61) - 12345
    sk = Sketcher(SketchConfig(dim=d, k=1, seed=3))
    idx = [0, 1, (1 << 31) - 1, 1 << 31, (1 << 40) + 7, d - 2, d - 1]
    pos = sk.perm(torch.tensor(idx))
    assert pos.tolist() == [py_perm(sk, j) for j in idx]
    assert sk.signs(torch.tensor(idx)).tolist() == [py_sign(sk, j) for j in idx]
    sk = Sketcher(SketchConfig(dim=1 << 40, k=1 << 21, seed=1))
    b = sk.bins(torch.tensor([0, (1 << 40) - 1, 123456789012]))
    assert b.tolist() == [py_perm(sk, j) * (1 << 21) // (1 << 40) for j in [0, (1 << 40) - 1, 123456789012]]


@pytest.mark.parametrize("permute,signs", [(True, True), (False, True), (True, False)])
def test_sketch_equals_its_definition_and_the_explicit_matrix(permute, signs):
    d, k = 257, 16
    sk = Sketcher(SketchConfig(dim=d, k=k, seed=7, permute=permute, signs=signs))
    x = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    j = torch.arange(d)
    proj = torch.zeros(k, d, dtype=torch.float64)
    proj[sk.bins(j), j] = sk.signs(j).double()
    expected = proj @ x
    assert torch.allclose(sk.sketch(x.float()).double(), expected, atol=1e-5)
    if permute and signs:
        assert torch.allclose(torch.tensor(py_sketch(sk, x.tolist()), dtype=torch.float64), expected, atol=1e-9)
    # The sum of add() over any split of the coordinates is the same sketch.
    acc = sk.zeros()
    for lo, hi in [(0, 5), (5, 100), (100, 101), (101, 257)]:
        sk.add(acc, lo, x[lo:hi].float())
    assert torch.allclose(acc.double(), expected, atol=1e-5)
    # Balanced bins: every bin holds floor(d/k) or ceil(d/k) coordinates.
    counts = torch.bincount(sk.bins(j), minlength=k)
    assert counts.min() >= d // k and counts.max() <= -(-d // k)


def test_add_rows_is_add_per_row():
    sk = Sketcher(SketchConfig(dim=300, k=8, seed=1))
    g = torch.randn(3, 120, generator=torch.Generator().manual_seed(1))
    rows = sk.zeros(3)
    sk.add_rows(rows, 50, g)
    for b in range(3):
        one = sk.zeros()
        sk.add(one, 50, g[b])
        assert torch.allclose(rows[b], one)
    with pytest.raises(ValueError, match="outside"):
        sk.add(sk.zeros(), 250, g[0])


def test_dot_products_are_unbiased_and_variance_shrinks_with_k():
    d, seeds = 4096, 300
    gen = torch.Generator().manual_seed(0)
    x = 1 + torch.randn(d, generator=gen)  # a common offset: without signs, every collision adds bias
    y = 0.5 * x + torch.randn(d, generator=gen)
    xy = torch.stack([x, y])
    true = float(x @ y)

    def dots(k, signs=True):
        out = []
        for seed in range(seeds):
            sk = Sketcher(SketchConfig(dim=d, k=k, seed=seed, signs=signs))
            s = sk.zeros(2)
            sk.add_rows(s, 0, xy)
            out.append(float(s[0] @ s[1]))
        return torch.tensor(out, dtype=torch.float64)

    d64, d16, d256 = dots(64), dots(16), dots(256)
    se = float(d64.std()) / seeds ** 0.5
    assert abs(float(d64.mean()) - true) < 4 * se
    # The check has power: the no-sign ablation is biased by about sum(x) sum(y) / K.
    assert abs(float(dots(64, signs=False).mean()) - true) > 20 * se
    # Var ~ (|x|^2 |y|^2 + <x,y>^2) / K: 16x more bins, about 16x less variance (bound loosely).
    assert float(d256.var()) < float(d64.var()) / 2 < float(d16.var()) / 4


def test_signs_are_balanced_and_neighbours_uncorrelated():
    j = torch.arange(200_000)
    s = Sketcher(SketchConfig(dim=200_000, k=1, seed=5)).signs(j).float()
    assert abs(float(s.mean())) < 0.01
    assert abs(float((s[1:] * s[:-1]).mean())) < 0.01
    assert abs(float((s[1 << 16:] * s[:-(1 << 16)]).mean())) < 0.01


@pytest.mark.parametrize("permute", [True, False])
def test_nested_k_equals_a_direct_smaller_sketch(permute):
    d, k = 1001, 64  # d not a multiple of k: bins are uneven and nesting must still be exact
    x = torch.randn(d, generator=torch.Generator().manual_seed(2))
    big = Sketcher(SketchConfig(dim=d, k=k, seed=11, permute=permute)).sketch(x)
    for small in (32, 16, 1):
        direct = Sketcher(SketchConfig(dim=d, k=small, seed=11, permute=permute)).sketch(x)
        assert torch.allclose(nest(big, small), direct, atol=1e-4)
    assert torch.allclose(nest(torch.stack([big, 2 * big]), 16)[1], 2 * nest(big, 16), atol=1e-4)
    with pytest.raises(UserError, match="does not divide"):
        nest(big, 24)


def test_plan_and_on_the_fly_paths_agree(monkeypatch):
    monkeypatch.setattr(sketch_mod, "CHUNK", 37)  # several chunks per span on both paths
    cfg = SketchConfig(dim=500, k=32, seed=4)
    gen = torch.Generator().manual_seed(3)
    spans = [(0, 130), (130, 131), (131, 500)]
    fly, planned = Sketcher(cfg, plan_limit=0), Sketcher(cfg, plan_limit=1 << 20)
    for _ in range(2):  # the second pass hits the cached plans
        g = torch.randn(2, 500, generator=gen)
        acc_fly, acc_plan = fly.zeros(2), planned.zeros(2)
        for lo, hi in spans:
            fly.add_rows(acc_fly, lo, g[:, lo:hi])
            planned.add_rows(acc_plan, lo, g[:, lo:hi])
        assert torch.equal(acc_fly, acc_plan)
    assert len(planned._plans) == len(spans) and not fly._plans
    # The plan budget bounds the cache: with room for 200 coordinates only the first two spans fit.
    partial = Sketcher(cfg, plan_limit=200)
    acc = partial.zeros()
    for lo, hi in spans:
        partial.add(acc, lo, g[0, lo:hi])
    assert len(partial._plans) == 2 and torch.equal(acc, acc_fly[0])


@pytest.mark.parametrize("kw,key", [({"dim": 0, "k": 1}, "dim"), ({"dim": 10, "k": 11}, "k"),
                                    ({"dim": 10, "k": 0}, "k"), ({"dim": 1 << 40, "k": 1 << 22}, "k"),
                                    ({"dim": 10, "k": 2.0}, "k")])
def test_bad_config_is_one_line_naming_the_key(kw, key):
    with pytest.raises(UserError) as e:
        SketchConfig(**kw)
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


def test_config_round_trips_and_rejects_unknown_keys():
    cfg = SketchConfig(dim=100, k=10, seed=3, permute=False)
    assert SketchConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="'kk'"):
        SketchConfig.from_dict({"dim": 100, "kk": 10})


def test_ranking_metrics_keep_the_worst_query_visible():
    """One query that finds every positive and one that finds none: the mean is 0.5 and the worst 0."""
    from zobench.influence.metrics import ranking_metrics

    labels = np.array([True, True, False, False, False, False])
    good = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.0])
    bad = -good
    m = ranking_metrics(np.stack([good, bad]), labels, k=2)
    assert m["recall_per_query"] == [1.0, 0.0] and m["recall_min"] == 0.0
    assert m["recall_at_k"] == pytest.approx(0.5) and m["auroc"] == pytest.approx(0.5)
