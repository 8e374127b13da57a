"""The ZO engine on a tiny random Llama: perturbation, estimate, masks, optimisation."""

from __future__ import annotations

import time

import pytest
import torch

from zobench.data.calibration import corpus_batches
from zobench.methods.masked import sensitive_mask
from zobench.zo import masks as M
from zobench.zo.directions import draw, make_generator
from zobench.zo.drift import measure_restore_drift
from zobench.zo.mask_build import lm_loss
from zobench.zo.optim import make_optimizer
from zobench.zo.trainable import DenseTrainable, SparseTrainable
from zobench.zo.trainer import ZOTrainer

BATCH = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(1))


def fixed_batch_loss(model, batch):
    return lm_loss(model, batch)


def exact_lm_loss(model, batch):
    """Next-token loss in the model's own precision (transformers' loss upcasts only to float32)."""
    logits = model(input_ids=batch).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
def test_same_seed_same_z_and_moments(direction):
    a = draw(100_003, make_generator(7), direction)
    b = draw(100_003, make_generator(7), direction)
    c = draw(100_003, make_generator(8), direction)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.numel() == 100_003
    assert abs(float(a.mean())) < 0.02          # E[z] = 0
    assert abs(float((a * a).mean()) - 1) < 0.02  # E[z_i^2] = 1
    assert abs(float((a[:-1] * a[1:]).mean())) < 0.02  # E[z_i z_j] = 0
    if direction == "rademacher":
        assert set(a.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_restore_is_bit_exact(tiny, dtype):
    model = tiny.model.to(dtype)
    params = M.scoped_params(model, "linear")
    t = SparseTrainable(params, M.random_mask(params, 0.05, seed=0))
    before = snapshot(model)
    t.apply(3, 1e-3)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    t.apply(3, -1e-3)
    t.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_restore_with_master_is_bit_exact(tiny, dtype):
    model = tiny.model.to(dtype)
    t = DenseTrainable(M.scoped_params(model, "all"), master=True)
    before = snapshot(model)
    drift = measure_restore_drift(t, 1e-3)
    assert drift["restore_drift_frac_changed"] == 0.0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_dense_in_place_drift_is_reported_and_within_an_ulp(tiny):
    # In place, w + eps z - 2 eps z + eps z rounds: not bit-exact in float32. The drift is what we
    # report; it must stay at rounding level (a few ulps of eps), never a systematic shift.
    t = DenseTrainable(M.scoped_params(tiny.model, "all"))
    drift = measure_restore_drift(t, 1e-3)
    assert 0 < drift["restore_drift_frac_changed"] < 1
    largest = max(float(p.detach().abs().max()) for p in tiny.model.parameters())
    assert drift["restore_drift_max_abs"] <= 4 * torch.finfo(torch.float32).eps * max(largest, 1e-3)


def test_the_probe_counts_the_values_a_perturbation_moves(tiny):
    """``perturb_frac_changed``: float32 weights all move at eps 1e-3; bfloat16 values whose spacing is
    wider than 2 eps (1.0: 2^-7) round back to themselves, and those with a finer one (0.01: 2^-14) move; a
    sparse trainable is judged on its selected values, not the whole tensors they sit in."""
    assert measure_restore_drift(DenseTrainable(M.scoped_params(tiny.model, "all")), 1e-3)["perturb_frac_changed"] == 1
    w = torch.nn.Parameter(torch.tensor([1.0] * 512 + [0.01] * 512, dtype=torch.bfloat16))
    assert measure_restore_drift(DenseTrainable([("w", w)]), 1e-3)["perturb_frac_changed"] == 0.5
    params = M.scoped_params(tiny.model, "linear")
    sparse = SparseTrainable(params, M.random_mask(params, 0.01, seed=0))
    assert measure_restore_drift(sparse, 1e-3)["perturb_frac_changed"] == 1


@pytest.mark.parametrize("chunk", [None, 1000], ids=["one-chunk", "many-chunks"])
def test_projected_gradient_is_the_directional_derivative(tiny, chunk, monkeypatch):
    if chunk:  # dense passes draw z chunk by chunk; the estimate must not depend on the chunking
        monkeypatch.setattr("zobench.zo.trainable.CHUNK", chunk)
    model = tiny.model.double()
    params = M.scoped_params(model, "all")
    t = DenseTrainable(params, direction="gaussian")
    eps, seed = 1e-4, 11  # small for truncation error, not smaller: RMSNorm runs in float32 here
    # The SPSA estimate (L(w + eps z) - L(w - eps z)) / (2 eps) against autograd's grad . z. Both losses
    # in float64: transformers' own loss upcasts only to float32, and its rounding (~1e-6 of a loss of
    # ~10) divided by 2 eps is a 0.5% error, as large as the tolerance.
    t.apply(seed, eps)
    with torch.no_grad():
        lp = float(exact_lm_loss(model, BATCH))
    t.apply(seed, -eps)
    with torch.no_grad():
        lm = float(exact_lm_loss(model, BATCH))
    t.restore()
    g_zo = (lp - lm) / (2 * eps)
    loss = exact_lm_loss(model, BATCH)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    exact = 0.0
    for g, z in zip(grads, t.directions(seed)):
        if g is not None:
            exact += float((g * z).sum())
    assert g_zo == pytest.approx(exact, rel=1e-3)


def test_sparse_methods_change_only_masked_entries(tiny):
    model = tiny.model
    params = M.scoped_params(model, "linear")
    mask = M.random_mask(params, 0.02, seed=0)
    before = snapshot(model)
    trainer = ZOTrainer(model, SparseTrainable(params, mask), make_optimizer("sgd", 1e-2), fixed_batch_loss, 1e-3)
    for i in range(5):
        trainer.step(BATCH, i)
    changed_total = 0
    for n, p in model.named_parameters():
        changed = (p != before[n]).reshape(-1).nonzero().squeeze(1)
        allowed = set(mask.get(n, torch.empty(0, dtype=torch.long)).tolist())
        assert set(changed.tolist()) <= allowed, n
        changed_total += changed.numel()
    assert changed_total > 0.5 * M.mask_nnz(mask)


@pytest.mark.parametrize("density", [1e-3, 0.01, 0.3])
def test_random_mask_density_is_exact(tiny, density):
    params = M.scoped_params(tiny.model, "linear")
    total = sum(p.numel() for _, p in params)
    mask = M.random_mask(params, density, seed=3)
    assert M.mask_nnz(mask) == round(density * total)
    for n, idx in mask.items():
        assert len(set(idx.tolist())) == idx.numel()  # distinct
    assert M.random_mask(params, density, seed=3).keys() == mask.keys()


def test_sensitive_mask_is_topk_of_squared_gradients(tiny, tokenizer, data_dir, tmp_path):
    model = tiny.model
    params = M.scoped_params(model, "linear")
    mask, info = sensitive_mask(model, tokenizer, params, 0.01, 3, 32, str(data_dir), tmp_path, tiny.vocab_size)
    # Brute force: per calibration sequence a full gradient, squared, summed; one global top-k.
    batches = corpus_batches(data_dir / "c4/c4_validation_2k.jsonl", tokenizer, 3, 32, tiny.vocab_size)
    acc = [torch.zeros_like(p) for _, p in params]
    for b in batches:
        grads = torch.autograd.grad(lm_loss(model, b), [p for _, p in params])
        for a, g in zip(acc, grads):
            a += g * g
    flat = torch.cat([a.reshape(-1) for a in acc])
    k = round(0.01 * flat.numel())
    top = set(torch.topk(flat, k).indices.tolist())
    offsets, got = 0, set()
    for (n, p) in params:
        got |= {offsets + i for i in mask.get(n, torch.empty(0, dtype=torch.long)).tolist()}
        offsets += p.numel()
    assert len(got) == k
    assert len(got & top) >= k - 2  # ties at the k-th value may swap
    assert info["density_obtained"] == pytest.approx(k / flat.numel())
    assert 0.01 < info["sqgrad_mass_frac"] <= 1.0
    assert info["mask_cache_hit"] is False
    again, info2 = sensitive_mask(model, tokenizer, params, 0.01, 3, 32, str(data_dir), tmp_path, tiny.vocab_size)
    assert info2["mask_cache_hit"] is True
    assert all(torch.equal(again[n], mask[n]) for n in mask)
    assert info2["sqgrad_mass_frac"] == info["sqgrad_mass_frac"] and info2["mask_nnz"] == info["mask_nnz"]


def test_a_cached_mask_that_is_not_one_of_these_weights_is_built_again(tmp_path):
    """The mask cache is data: an index past its weight, unsorted indices, a tensor of no parameter, a file
    that is not safetensors or metadata that is not JSON are a miss (the mask is built again and replaces
    it), and a file's metadata never puts keys of its choosing into the record."""
    from safetensors.torch import save_file

    from zobench.zo.mask_build import MaskCache, MaskSpec, cached_mask

    params = [("a", torch.zeros(10)), ("b", torch.zeros(4, 4))]
    good = {"a": torch.tensor([1, 5]), "b": torch.tensor([0, 15])}
    builds = []

    def make():
        builds.append(1)
        return good, {"sqgrad_mass_frac": 0.5}

    spec = MaskSpec("sensitive", 0.25)
    mask, info = cached_mask(spec, params, make, tmp_path, fingerprint="w")
    cache = MaskCache(tmp_path)
    path = cache.root / f"{cache.key(spec, 'w')}.safetensors"
    assert info["mask_cache_hit"] is False and path.is_file()
    bad_masks = [{"a": torch.tensor([1, 10])}, {"a": torch.tensor([5, 1])}, {"a": torch.tensor([-1, 2])},
                 {"c": torch.tensor([0])}, {"b": torch.tensor([[0, 1]])}, {"a": torch.tensor([2, 2])}]
    for bad in bad_masks:
        save_file(bad, str(path), metadata={"info": "{}"})
        mask, info = cached_mask(spec, params, make, tmp_path, fingerprint="w")
        assert info["mask_cache_hit"] is False and all(torch.equal(mask[n], good[n]) for n in good), bad
    for text in (b"not safetensors", None):
        if text is None:
            save_file(good, str(path), metadata={"info": "{not json"})
        else:
            path.write_bytes(text)
        assert cached_mask(spec, params, make, tmp_path, fingerprint="w")[1]["mask_cache_hit"] is False
    save_file(good, str(path), metadata={"info": '{"test_after": {"accuracy": 1.0}, "mask_nnz": 99, '
                                                 '"sqgrad_mass_frac": "x", "calib_corpus": {"source": "packaged"}, '
                                                 '"mask_route": ["x"]}'})
    mask, info = cached_mask(spec, params, make, tmp_path, fingerprint="w")
    assert info["mask_cache_hit"] is True and "test_after" not in info and "sqgrad_mass_frac" not in info
    assert info["mask_nnz"] == 4 and info["calib_corpus"] == {"source": "packaged"} and "mask_route" not in info
    assert len(builds) == 1 + len(bad_masks) + 2


def test_magnitude_mask_matches_brute_force(tiny):
    params = M.scoped_params(tiny.model, "linear")
    mask = M.magnitude_mask(params, 0.01)
    flat = torch.cat([p.detach().abs().reshape(-1) for _, p in params])
    k = round(0.01 * flat.numel())
    assert M.mask_nnz(mask) == k  # the whole top 1%, not any subset of it
    kth = torch.topk(flat, k).values[-1]
    for n, p in params:
        sel = p.detach().abs().reshape(-1)[mask.get(n, torch.empty(0, dtype=torch.long))]
        assert bool((sel >= kth).all())
        assert mask.get(n, torch.empty(0, dtype=torch.long)).unique().numel() == sel.numel()


def _train(model, method, steps, seed=0, lr=None):
    params = M.scoped_params(model, "all" if method == "full" else "linear")
    if method == "full":
        trainable, lr = DenseTrainable(params), lr or 2e-4
    else:
        mask = M.random_mask(params, 0.05, seed) if method == "random" else \
            M.topk_mask(M.squared_gradients(model, params, [BATCH], fixed_batch_loss).items(), 0.05)
        trainable, lr = SparseTrainable(params, mask), lr or 2e-2
    trainer = ZOTrainer(model, trainable, make_optimizer("sgd", lr), fixed_batch_loss, 1e-3, seed=seed)
    return [trainer.step(BATCH, i).loss for i in range(steps)]


# CI keeps the sensitive mask (the others learn in test_methods.py's smoke path and the suites)
@pytest.mark.parametrize("method", [pytest.param("full", marks=pytest.mark.slow),
                                    pytest.param("random", marks=pytest.mark.slow), "sensitive"])
def test_zo_sgd_lowers_the_loss_on_a_fixed_batch(method):
    from zobench.models import load_model

    model = load_model("random:tiny-llama", seed=0).model
    with torch.no_grad():
        start = float(fixed_batch_loss(model, BATCH))
    trace = _train(model, method, 300)
    with torch.no_grad():
        end = float(fixed_batch_loss(model, BATCH))
    assert end < start - 0.05, (start, end)
    assert sum(trace[-20:]) / 20 < sum(trace[:20]) / 20


def test_same_seed_gives_bitwise_identical_loss_trace():
    from zobench.models import load_model

    traces = [_train(load_model("random:tiny-llama", seed=0).model, "random", 20, seed=5) for _ in range(2)]
    assert traces[0] == traces[1]
    other = _train(load_model("random:tiny-llama", seed=0).model, "random", 20, seed=6)
    assert other != traces[0]


def test_cells_that_need_the_same_mask_at_once_build_it_once(tmp_path):
    """Two builders at once (cells side by side on one node): one builds, the other waits and loads it."""
    import threading

    from zobench.zo.mask_build import MaskSpec, cached_mask

    params = [("w", torch.arange(100, dtype=torch.float32).reshape(10, 10))]
    builds, results = [], []

    def make():
        builds.append(1)
        time.sleep(1.0)  # long enough that the second builder arrives while the first is still building
        return {"w": torch.tensor([3, 7, 42])}, {}

    def build():
        results.append(cached_mask(MaskSpec("random", 0.03, seed=0), params, make, tmp_path))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert sorted(info["mask_cache_hit"] for _, info in results) == [False, True]
    assert all(mask["w"].tolist() == [3, 7, 42] for mask, _ in results)


@pytest.mark.parametrize("method", ["full", "random", "lezo"])
def test_a_folded_run_is_the_unfolded_run_bit_for_bit(method):
    """ZO2's fold (a step's restore and update done inside the next step's +eps pass) changes when the
    update is applied, never what it computes: over 100 steps of a tiny Llama, float32, SGD with weight
    decay, the losses and every weight equal the unfolded trainer's."""
    from zobench.cell.run import Run
    from zobench.methods import get_method
    from zobench.models import load_model
    from zobench.spec.config import CellConfig
    from zobench.tasks import get_task
    from zobench.zo.masks import scoped_params

    def train(fold: bool):
        cfg = CellConfig.from_dict(dict(model="random:tiny-llama", task="sst2", method=method, lr=1e-3,
                                        weight_decay=0.1, steps=100, batch_size=2, max_length=16, density=0.05,
                                        n_train=8, n_dev=0, n_test=0, layer_fraction=0.5))
        run = Run(cfg, "cpu", get_task("sst2"), get_task("sst2").sample(None, 8, 0, 0, 0))
        run.loaded = load_model("random:tiny-llama", seed=0)
        run.params = scoped_params(run.model, cfg.resolved_scope)
        method_ = get_method(cfg.method)
        if cfg.method_info.needs_mask:
            run.mask, _ = method_.build_mask(run)
        stepper, _ = method_.build_stepper(run)
        stepper.fold = fold
        stream = run.batches()
        losses = [stepper.step(run.encode(next(stream)), i).loss for i in range(cfg.steps)]
        stepper.flush()
        return losses, {n: p.detach().clone() for n, p in run.model.named_parameters()}

    (l1, w1), (l2, w2) = train(False), train(True)
    assert l1 == l2
    assert all(torch.equal(w1[n], w2[n]) for n in w1)
    start = dict(load_model("random:tiny-llama", seed=0).model.named_parameters())
    assert any(not torch.equal(w1[n], start[n]) for n in w1)  # it trained: there was something to fold


@pytest.mark.parametrize("by_topk", [False, True])
@pytest.mark.parametrize("density", [1e-3, 0.05, 0.5, 1.0])
def test_the_running_global_topk_is_the_topk_of_all_the_scores_and_their_mass(density, by_topk, monkeypatch):
    """Streamed over tensors (a later tensor only offers what beats the k-th best so far), the mask is the
    top k of every score at once; distinct values, so no tie decides. Either way of finding the k-th largest."""
    kth = M._kth_largest
    monkeypatch.setattr(M, "_kth_largest", lambda values, k, _=None: kth(values, k, by_topk))
    g = torch.Generator().manual_seed(1)
    sizes = [5000, 300, 12000, 7, 4000]
    flat = torch.randperm(sum(sizes), generator=g).float()
    scores = list(zip([f"t{j}" for j in range(len(sizes))], flat.split(sizes)))
    k = int(round(density * flat.numel()))
    best = set(torch.topk(flat, k).indices.tolist())
    mass: dict = {}
    mask = M.topk_mask(iter(scores), density, total=flat.numel(), mass=mass)
    offsets = dict(zip([n for n, _ in scores], [sum(sizes[:j]) for j in range(len(sizes))]))
    got = {offsets[n] + i for n, idx in mask.items() for i in idx.tolist()}
    assert got == best
    assert mass["covered"] == pytest.approx(float(flat[list(best)].double().sum()))
    assert mass["total"] == pytest.approx(float(flat.double().sum()))


@pytest.mark.parametrize("by_topk", [False, True])
@pytest.mark.parametrize("chunk", [7, 1000, 1 << 22])
def test_the_running_topk_reads_in_chunks_and_breaks_ties_by_position(monkeypatch, chunk, by_topk):
    """Few distinct values, so ties at the k-th value decide: of equal values the first in the scope's order
    (tensor by tensor, then flat index) are kept, whatever the chunk the tensors are read in; the rest is the
    top k of everything at once. Both ways of finding the k-th largest (kthvalue on a CPU, an unsorted topk
    on a GPU) give that same mask."""
    monkeypatch.setattr(M, "CHUNK", chunk)
    kth = M._kth_largest
    monkeypatch.setattr(M, "_kth_largest", lambda values, k, _=None: kth(values, k, by_topk))
    g = torch.Generator().manual_seed(2)
    sizes = [500, 30, 1200, 7, 400]
    flat = torch.randint(0, 9, (sum(sizes),), generator=g).float()
    scores = list(zip([f"t{j}" for j in range(len(sizes))], flat.split(sizes)))
    offsets = dict(zip([n for n, _ in scores], [sum(sizes[:j]) for j in range(len(sizes))]))
    for density in (0.01, 0.2, 0.5):
        k = int(round(density * flat.numel()))
        # stable sort on descending values: ties in position order
        expected = set(sorted(range(flat.numel()), key=lambda j: (-float(flat[j]), j))[:k])
        mask = M.topk_mask(iter(scores), density, total=flat.numel())
        got = {offsets[n] + i for n, idx in mask.items() for i in idx.tolist()}
        assert got == expected
        assert all(torch.equal(idx, torch.sort(idx).values) for idx in mask.values())


def test_a_density_that_rounds_to_no_entry_selects_none_and_still_counts_the_mass():
    scores = [("a", torch.ones(10)), ("b", torch.full((5,), 2.0))]
    mass: dict = {}
    assert M.topk_mask(iter(scores), 0.01, total=15, mass=mass) == {}
    assert mass == {"total": 20.0, "covered": 0.0}
