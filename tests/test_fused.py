"""The fused ZO passes (zobench.zo.fused): Philox against its published answers, the C kernel against the
torch fallback, z's statistics, and the trainables' fused passes against their unfused meaning.

Statistical checks use 6-sigma bounds (two-sided normal tail 2e-9 each); with the ~140 bounds below
(128 of them per bit position) a correct generator fails a run with probability below 3e-7.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from zobench.zo import fused, philox
from zobench.zo.kernels import build
from zobench.zo.optim import make_optimizer
from zobench.zo.trainable import DenseTrainable, SparseTrainable

# Random123's kat_vectors, the "philox4x32 10" lines: counter (4 words), key (2 words) -> output (4 words).
KAT = [((0x00000000,) * 4, (0x00000000,) * 2, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIX_SIGMA = 6.0

needs_c = pytest.mark.skipif(fused.path() != fused.C_PATH, reason=f"no C kernel: {fused.fallback_reason()}")


def z_of(n: int, direction: str, seed: int, offset: int = 0) -> torch.Tensor:
    return fused.fill_z(torch.empty(n), offset, direction, seed)


def test_philox_matches_random123_known_answers():
    for ctr, key, expected in KAT:
        words = philox.philox([torch.tensor([c], dtype=torch.int64) for c in ctr], key)
        assert tuple(int(w) for w in words) == expected
        if fused.path() == fused.C_PATH:
            assert tuple(fused.block(ctr, key)) == expected


@needs_c
@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_c_kernel_and_torch_fallback_are_bit_identical(direction, dtype):
    gen = torch.Generator().manual_seed(0)
    terms = [(2**63 + 12345, 1e-3), (2**63 + 12345, -2.5e-3), (2**40, 3e-4)]  # a seed twice: z drawn once
    live = torch.randn(100_003, generator=gen).to(dtype)
    master = torch.randn(50_001, generator=gen)
    index = torch.randperm(live.numel(), generator=gen)[:master.numel()]
    cases = [dict(terms=terms, decay=(1, 0.999)),  # in place: restore, decay, update, perturb
             dict(master=torch.randn(live.numel(), generator=gen), terms=terms[:2], live_terms=terms[2:],
                  decay=(0, 0.99)),                # a float32 master of every value
             dict(master=master, index=index, terms=terms[:1], live_terms=terms[1:2])]  # sparse
    for case in cases:
        outs = []
        for ctx in (contextlib.nullcontext(), fused.torch_fallback()):
            got = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
            out = live.clone()
            with ctx:
                fused.zpass(out, 1234567, direction, **got)
            outs.append((out, got.get("master")))
        assert torch.equal(outs[0][0], outs[1][0])
        if outs[0][1] is not None:
            assert torch.equal(outs[0][1], outs[1][1])


@needs_c
def test_gaussian_z_c_and_torch_agree_bit_for_bit_and_follow_box_muller():
    # The tolerance between the two implementations is 0: both make the same IEEE operations (zo_pass.c's
    # header). Measured over 10^7 values by bench/zo_kernel.py; 2^21 here.
    n, seed = 1 << 21, 99
    c = z_of(n, "gaussian", seed, offset=5)
    with fused.torch_fallback():
        t = z_of(n, "gaussian", seed, offset=5)
    assert torch.equal(c, t)
    # Against Box-Muller with torch's own float64 log/cos/sin: the same up to one float32 ulp, in a few
    # values per million (zobench's log/sin/cos are within ~1 ulp of a double).
    w = philox.blocks(seed, 0, n // 4, "cpu")
    rad = torch.sqrt(-2 * torch.log((w[0].double() + 0.5) * 2.0**-32))
    ref = (rad * torch.cos((w[1].double() + 0.5) * philox.TWO_PI_2M32)).float()
    ours = z_of(n, "gaussian", seed).view(-1, 4)[:, 0]
    differ = ours != ref
    assert int(differ.sum()) <= 10
    ulp = torch.finfo(torch.float32).eps * ref[differ].abs().clamp(min=1e-30)
    assert bool(((ours[differ] - ref[differ]).abs() <= ulp).all())


@needs_c
@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
def test_same_z_whatever_the_chunking_and_the_thread_count(direction, monkeypatch):
    n, seed = 300_000, 2**33 + 5  # above the kernel's PARALLEL_MIN, so two threads do split it
    whole = z_of(n, direction, seed)
    cuts = [0, 1, 127, 129, 1000, 1024, 70_001, n]
    pieces = torch.cat([z_of(b - a, direction, seed, offset=a) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(whole, pieces)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = z_of(n, direction, seed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, one)
    monkeypatch.setattr(philox, "PHILOX_CHUNK", 999)
    with fused.torch_fallback():
        assert torch.equal(whole[:20_000], z_of(20_000, direction, seed))


def _bound(values: torch.Tensor, expected: float, var: float) -> None:
    n = values.numel()
    assert abs(float(values.double().mean()) - expected) <= SIX_SIGMA * (var / n) ** 0.5


@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
def test_z_has_zero_mean_unit_variance_and_no_lag_correlation(direction):
    n = 1 << 22
    z = z_of(n, direction, 424242, offset=2**40)  # far indices: the counter's high word in use
    _bound(z, 0.0, 1.0)                                  # E[z] = 0
    _bound(z * z, 1.0, 0.0 if direction == "rademacher" else 2.0)  # E[z^2] = 1 (Var[z^2] = 2 for N(0, 1))
    for lag in (1, 4, 128):                              # E[z_i z_j] = 0, also across a Philox block
        _bound(z[:-lag] * z[lag:], 0.0, 1.0)
    if direction == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}
        for bit in range(128):                           # no bit position of a block biased
            _bound(z.view(-1, 128)[:, bit], 0.0, 1.0)
    else:
        for x, p in ((-2.0, 0.02275), (-1.0, 0.15866), (0.0, 0.5), (1.0, 0.84134)):  # the normal CDF
            _bound((z < x).double(), p, p * (1 - p))


def test_both_key_words_and_the_seed_change_z():
    base = z_of(4096, "rademacher", 5)
    for other in (6, 5 + 2**32, 5 + 2**63):
        assert not torch.equal(base, z_of(4096, "rademacher", other))


@needs_c
def test_march_native_changes_no_result(tmp_path):
    generic = fused.bind(build.load(tmp_path, tuple(f for f in build.FLAGS if f != "-march=native")))
    gen = torch.Generator().manual_seed(1)
    for direction in ("rademacher", "gaussian"):
        for dtype in DTYPES:
            live = torch.randn(70_000, generator=gen).to(dtype)
            outs = []
            for lib in (fused._state["lib"], generic):
                out = live.clone()
                fused.c_pass(lib, out, 3, direction, [11, 12], [1e-3, -1e-3], 2, 1, 0.999)
                outs.append(out)
            assert torch.equal(*outs), (direction, dtype)


def test_without_a_compiler_the_fallback_runs_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-zobench")
    with pytest.raises(build.BuildError, match="not found"):
        build.load()
    monkeypatch.setenv("CC", "false")  # found, fails
    with pytest.raises(build.BuildError, match="failed"):
        build.load()
    monkeypatch.setattr(fused, "_state", {})
    assert fused.path() == fused.TORCH_PATH
    assert "failed" in fused.fallback_reason()
    w = torch.zeros(10)
    fused.zpass(w, 0, "rademacher", [(1, 1.0)])  # runs, through torch
    assert set(w.tolist()) <= {-1.0, 1.0}


# -- the trainables ------------------------------------------------------------------------------------

def tensors(dtype=torch.float32, seed=0) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (37, 5), "a.bias": (129,), "b.weight": (300, 7), "norm": (3,)}
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype), requires_grad=False))
            for n, s in shapes.items()]


def snapshot(params):
    return [p.detach().clone() for _, p in params]


@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_apply_and_restore_with_a_master_are_bit_exact(direction, dtype):
    params = tensors(dtype)
    before = snapshot(params)
    t = DenseTrainable(params, direction, master=True)
    t.apply(77, 1e-3)
    assert not all(torch.equal(p, b) for (_, p), b in zip(params, before))
    t.apply(77, -1e-3)
    t.restore()
    assert all(torch.equal(p, b) for (_, p), b in zip(params, before))


def test_dense_in_place_passes_make_the_additions_of_the_unfused_code():
    # In place, w + eps z - 2 eps z + eps z rounds in float32 (no exact return, as before): the fused passes
    # must round exactly as the former add_ passes did, given the same z.
    params = tensors()
    t = DenseTrainable(params, "rademacher")
    expect = [p.detach().clone() for _, p in params]
    for e, z in zip(expect, t.directions(9)):
        e.add_(z, alpha=1e-3).add_(z, alpha=-2e-3).add_(z, alpha=1e-3)
    t.apply(9, 1e-3)
    t.apply(9, -1e-3)
    t.restore()
    assert all(torch.equal(p, e) for (_, p), e in zip(params, expect))


def _run(params, master: bool, fold: bool, steps: int = 100, dtype_check=None):
    """``steps`` SGD steps with weight decay, the update folded into the next +eps pass or not."""
    t = DenseTrainable(params, "rademacher", master=master)
    opt = make_optimizer("sgd", 1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    seeds = [int(s) for s in torch.randint(0, 2**62, (101,), generator=gen)]
    coefs = torch.randn(100, generator=gen).tolist()
    t.apply(seeds[0], 1e-3)
    live = []
    for step in range(steps):
        t.apply(seeds[step], -1e-3)
        grads = [(seeds[step], coefs[step])]
        if fold:
            t.fold_step(grads, opt, step, seeds[step + 1], 1e-3)
        else:
            t.update(grads, opt, step)
            t.apply(seeds[step + 1], 1e-3)
        live.append(snapshot(params))
    return live, t.masters


@pytest.mark.parametrize("master", [False, True], ids=["in-place", "master"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fold_step_equals_update_then_apply_bit_for_bit_over_100_steps(master, dtype):
    unfolded, m1 = _run(tensors(dtype), master, fold=False)
    folded, m2 = _run(tensors(dtype), master, fold=True)
    for step, (a, b) in enumerate(zip(unfolded, folded)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), step
    if master:
        assert all(torch.equal(x, y) for x, y in zip(m1, m2))
    with fused.torch_fallback():
        fallback, _ = _run(tensors(dtype), master, fold=True, steps=10)
    assert all(torch.equal(x, y) for x, y in zip(fallback[-1], folded[9]))


def test_dense_momentum_update_uses_philox_z():
    params = tensors()
    before = snapshot(params)
    t = DenseTrainable(params, "gaussian")
    opt = make_optimizer("momentum", 1e-2)
    t.update([(5, 0.5)], opt, 0)  # first step: the buffer is the estimate itself
    for (_, p), b, z in zip(params, before, t.directions(5)):
        assert torch.equal(p, b.add(z.mul(0.5), alpha=-1e-2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_passes_write_only_the_indexed_entries(dtype):
    params = tensors(dtype)
    gen = torch.Generator().manual_seed(4)
    mask = {n: torch.randperm(p.numel(), generator=gen)[:max(1, p.numel() // 10)] for n, p in params[:3]}
    before = snapshot(params)
    t = SparseTrainable(params, mask, "gaussian")
    z = t.z(21)

    def check(expected_values):
        seen = 0
        for (n, p), b in zip(params, before):
            flat, old = p.view(-1), b.view(-1).clone()
            if n in mask:
                old[mask[n]] = expected_values[seen:seen + mask[n].numel()].to(dtype)
                seen += mask[n].numel()
            assert torch.equal(flat, old), n

    t.apply(21, 1e-2)
    check(t.master.add(z, alpha=1e-2))
    t.restore()
    check(t.master)
    t.update([(21, 2.0)], make_optimizer("sgd", 1e-1, weight_decay=0.5), 0)
    check(t.master)
    assert not torch.equal(t.master, SparseTrainable(tensors(dtype), mask).master)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_passes_on_the_torch_path_go_over_all_tensors_at_once_with_the_same_numbers(dtype, monkeypatch):
    """On a GPU each pass of the torch path costs ~100 kernel launches whatever its length, so a sparse set
    spread over many tensors is perturbed and updated in one pass there: the same values as the C library's
    pass per tensor, bit for bit, through apply, restore, update, fold_step and weight decay."""
    gen = torch.Generator().manual_seed(5)

    def build():
        params = tensors(dtype)
        mask = {n: torch.randperm(p.numel(), generator=torch.Generator().manual_seed(i))[:max(1, p.numel() // 7)]
                for i, (n, p) in enumerate(params)}
        mask["norm"] = None  # a whole tensor trainable, as the value vectors of dense-and-sparse layers
        return params, SparseTrainable(params, mask, "gaussian")

    seeds = [int(s) for s in torch.randint(0, 2**62, (6,), generator=gen)]
    opt = make_optimizer("sgd", 1e-1, weight_decay=0.5)

    def steps(params, t):
        out = []
        t.apply(seeds[0], 1e-2)
        out.append(snapshot(params))
        t.apply(seeds[0], -1e-2)
        t.fold_step([(seeds[0], 0.7)], opt, 0, seeds[1], 1e-2)
        out.append(snapshot(params))
        t.restore()
        t.update([(seeds[2], -0.3), (seeds[3], 1.1)], opt, 1)
        out.append(snapshot(params))
        return out + [t.master.clone()]

    per_tensor = steps(*build())  # the C library, one pass per tensor
    calls = []
    run_pass = philox.run_pass
    monkeypatch.setattr(philox, "run_pass", lambda live, *a, **k: calls.append(live.numel()) or run_pass(live, *a, **k))
    params, t = build()
    with fused.torch_fallback():
        assert t._one_pass()
        at_once = steps(params, t)
    assert calls and all(n == t.numel for n in calls)  # every pass over all 4 tensors' values at once
    for a, b in zip(per_tensor[:-1], at_once[:-1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(per_tensor[-1], at_once[-1])


def test_the_torch_generator_draws_what_it_always_drew():
    from zobench.zo.directions import draw, make_generator

    params = tensors()
    dense = DenseTrainable(params, "rademacher", generator="torch")
    g = make_generator(8)
    assert all(torch.equal(z.view(-1), draw(p.numel(), g, "rademacher"))
               for z, (_, p) in zip(dense.directions(8), params))
    sparse = SparseTrainable(params, {n: None for n, _ in params}, "gaussian", generator="torch")
    assert torch.equal(sparse.z(8), draw(sparse.numel, make_generator(8), "gaussian"))


def test_generator_setting_and_cell_identity():
    import dataclasses

    from zobench.errors import UserError
    from zobench.spec.config import CellConfig
    from zobench.spec.matrix import cell_id, identity

    cfg = CellConfig.from_dict({"model": "random:tiny-llama", "method": "full"})
    assert cfg.generator == "philox" and identity(cfg)["generator"] == "philox"
    old = dataclasses.replace(cfg, generator="torch")
    assert "generator" not in identity(old)  # the ids of cells run before the setting existed are kept
    assert cell_id(old) != cell_id(cfg)
    with pytest.raises(UserError, match="generator"):
        CellConfig.from_dict({"generator": "mt19937"})


def test_pass_stats_say_which_kernel_ran_and_count_the_bytes():
    """A record names the implementation that ran its passes (``zo_passes``): the counters split by path, and
    the bytes are every value read and written (a master's too, an index read)."""
    live = torch.zeros(1000)
    fused.pass_stats(reset=True)
    fused.zpass(live, 0, "rademacher", [(1, 0.5)])
    with fused.torch_fallback():
        fused.zpass(live, 0, "rademacher", [(1, -0.5)])
    master, index = torch.zeros(10), torch.arange(10, dtype=torch.int64)
    fused.zpass(live, 0, "rademacher", [(2, 0.1)], master=master, index=index)
    stats = fused.pass_stats(reset=True)
    assert stats["calls"].get("torch") == 1 + (fused.path() == "torch") * 2
    assert sum(stats["calls"].values()) == 3 and stats["seconds"] > 0
    assert stats["bytes"] == 2 * 1000 * 4 * 2 + 10 * (2 * 4 + 8 + 8)
    assert fused.pass_stats()["calls"] == {}  # reset


def _quantized_tiny(packed: bool):
    """The tiny Llama on NF4 with a random 1% of each linear kept beside it (dense-and-sparse), its value
    vectors packed into one buffer or left one tensor per layer; and the trainable over them."""
    from zobench.models import load_model
    from zobench.quant import QuantContext, get_backend, quantize_model
    from zobench.quant.sparse import pack_values
    from zobench.zo import masks as M

    model = load_model("random:tiny-llama", seed=0).model
    mask = M.random_mask(M.scoped_params(model, "linear"), 0.01, seed=0)
    vectors = quantize_model(model, get_backend("nf4"), QuantContext(), M.linear_layers(model), mask)
    if packed:
        vectors = pack_values(model, vectors)
    return model, SparseTrainable.of_vectors(vectors, "rademacher")


@pytest.mark.parametrize("path", ["c", "torch"])
def test_packed_values_train_bit_for_bit_as_separate_ones_in_one_pass(path):
    """pack_values puts the dense-and-sparse layers' values end to end in one buffer: the trainable then
    passes over all of them at once (one operation, where it was one per layer: ~1,200 kernel launches a
    perturbation of a 7B model on a GPU) and every value, live and master, is what the per-layer passes give,
    through perturbations, restores and both kinds of update; the layers' outputs too."""
    pytest.importorskip("bitsandbytes")
    from torch.profiler import ProfilerActivity, profile

    ctx = fused.torch_fallback() if path == "torch" else contextlib.nullcontext()
    with ctx:
        (m1, apart), (m2, packed) = _quantized_tiny(False), _quantized_tiny(True)
        assert apart.flat is None and packed.flat is not None and packed.numel == apart.numel
        x = torch.randint(3, 100, (2, 12))

        def same():
            assert torch.equal(apart.master, packed.master)
            for p, q in zip(apart.params, packed.params):
                assert torch.equal(p, q)
            assert torch.equal(m1(x).logits, m2(x).logits)

        for t in (apart, packed):
            t.apply(7, 1e-3)
        same()
        for t in (apart, packed):  # each its own optimizer: momentum keeps state
            sgd, momentum = make_optimizer("sgd", 1e-2, weight_decay=0.1), make_optimizer("momentum", 1e-2)
            t.restore()
            t.update([(7, 0.5), (8, -0.25)], sgd, 0)  # the fused SGD pass
            t.update([(9, 1.5)], momentum, 1)  # the master updated whole, then written
            t.apply(10, -1e-3)
        same()
        counts = []
        for t in (apart, packed):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t.apply(11, 1e-3)
            counts.append(sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None))
        # at least one operation a layer fewer (torch: 167 -> 137 here, its Philox rounds the rest; C: 15 -> 0)
        assert counts[0] - counts[1] >= len(apart.params), counts


def test_a_quantized_sparse_cell_trains_its_values_packed():
    """The pipeline packs the values it keeps beside the quantized layers (``pack_values``), so its
    trainable passes over them in one operation."""
    pytest.importorskip("bitsandbytes")
    from zobench.cell.pipeline import Pipeline
    from zobench.spec.config import CellConfig

    p = Pipeline(CellConfig.from_dict(dict(model="random:tiny-llama", task="sst2", method="random", density=0.01,
                                           quant="nf4", n_train=8, n_dev=0, n_test=0, eval_before=False,
                                           eval_after=False, batch_size=2, max_length=16, steps=1,
                                           warmup_steps=0, device="cpu")))
    assert p.run().ok
    assert p.trainable.flat is not None and len(p.trainable.params) > 1
    assert p.trainable.flat.untyped_storage().data_ptr() == p.trainable.params[-1].untyped_storage().data_ptr()
