"""The sensitive mask of a streamed model, block by block (zobench.models.layerwise): the same squared
gradients, mask, sparse values and training as the whole float model's, without the float model whole."""

from __future__ import annotations

import pytest
import torch

from zobench.cell.pipeline import Pipeline
from zobench.fingerprint import weights_fingerprint
from zobench.models import layerwise, load_model
from zobench.spec.config import CellConfig
from zobench.zo import masks as M
from zobench.zo.mask_build import lm_loss

SEED = 5


def calibration(vocab: int, n: int = 3, length: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def test_block_by_block_squared_gradients_are_the_whole_models():
    whole = load_model("random:tiny-llama", seed=SEED).model
    params = M.scoped_params(whole, "linear")
    batches = calibration(whole.config.vocab_size)
    expected = M.squared_gradients(whole, params, batches, lm_loss)

    loaded = load_model("random:tiny-llama", seed=SEED, defer_linears=True)
    model, deferred = loaded.model, loaded.deferred
    assert layerwise.supports(model)
    got = dict(layerwise.squared_gradients(model, deferred, batches, [n for n, _ in params]))
    order = [n for n, _ in params if n.startswith("model.layers.1.")] + \
        [n for n, _ in params if n.startswith("model.layers.0.")]
    assert list(got) == order  # the last block first, each tensor once
    for name, want in expected.items():
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=want.abs().max().item() * 1e-5, msg=name)
    # Every block linear is back on the meta device afterwards, and no parameter was left trainable.
    assert all(p.is_meta for n, p in model.named_parameters() if n in expected)
    assert not any(p.requires_grad for p in model.parameters() if not p.is_meta) or \
        all(p.requires_grad for p in whole.parameters())
    for density in (0.01, 0.05):
        a = M.topk_mask(expected.items(), density)
        mass: dict = {}
        b = M.topk_mask(iter(got.items()), density, total=sum(t.numel() for t in got.values()), mass=mass)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        assert mass["covered"] / mass["total"] == pytest.approx(M.mass_fraction(expected, a), rel=1e-6)


def test_a_streamed_models_fingerprint_reads_its_deferred_linears_as_drawn():
    whole = load_model("random:tiny-llama", seed=SEED).model
    loaded = load_model("random:tiny-llama", seed=SEED, defer_linears=True)
    name = "model.layers.1.mlp.down_proj.weight"
    head = loaded.deferred.head(loaded.model, name)
    assert torch.equal(head, whole.get_parameter(name).detach().reshape(-1)[:1024])
    assert loaded.deferred.fingerprint(loaded.model, loaded.model.named_parameters()) == \
        weights_fingerprint(list(whole.named_parameters()))
    other = load_model("random:tiny-llama", seed=SEED + 1, defer_linears=True)
    assert other.deferred.fingerprint(other.model, other.model.named_parameters()) != \
        weights_fingerprint(list(whole.named_parameters()))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny Llama saved as a pretrained checkpoint in several safetensors shards, with a tokenizer."""
    from zobench.models.load import builtin_tokenizer

    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    load_model("random:tiny-llama", seed=SEED).model.save_pretrained(folder, max_shard_size="2MB")
    builtin_tokenizer().save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def test_a_checkpoint_streams_shard_by_shard_to_the_model_from_pretrained_loads(checkpoint):
    whole = load_model(str(checkpoint))
    assert whole.deferred is None
    streamed = load_model(str(checkpoint), defer_linears=True)
    deferred = streamed.deferred
    assert type(deferred).__name__ == "FromShards" and len(deferred.names) == 14
    assert streamed.model.model.layers[1].mlp.up_proj.weight.is_meta
    assert deferred.fingerprint(streamed.model, streamed.model.named_parameters()) == \
        weights_fingerprint(list(whole.model.named_parameters()))
    list(deferred.arrive(streamed.model))
    a, b = dict(streamed.model.named_parameters()), dict(whole.model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert streamed.model.lm_head.weight is streamed.model.model.embed_tokens.weight  # still tied
    for name, buf in whole.model.named_buffers():
        assert torch.equal(buf, streamed.model.get_buffer(name)), name


def test_a_checkpoint_with_other_tensor_names_loads_whole(checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "renamed"
    shutil.copytree(checkpoint, folder)
    index = folder / "model.safetensors.index.json"
    index.unlink()
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    save_file({f"transformer.{k}": v for k, v in tensors.items()}, folder / "model.safetensors")
    assert load_model(str(folder), defer_linears=True).deferred is None or pytest.fail("streamed a renamed checkpoint")


def cell(method: str, model: str = "random:tiny-llama", quant: str = "nf4") -> dict:
    return {"model": model, "task": "sst2", "method": method, "quant": quant, "density": 0.01,
            "n_train": 16, "n_dev": 0, "n_test": 0, "batch_size": 4, "max_length": 32, "steps": 6,
            "warmup_steps": 0, "lr": 1e-2, "eval_before": False, "eval_after": False, "device": "cpu",
            "seed": SEED, "calib_sequences": 2, "calib_length": 32}


@pytest.mark.parametrize("method,source,quant", [("sensitive", "random", "nf4"), ("random", "random", "nf4"),
                                                 ("sensitive", "checkpoint", "nf4"), ("sensitive", "random", "none")])
def test_a_streamed_mask_cell_equals_the_one_that_held_the_float_model(method, source, quant, monkeypatch,
                                                                       tmp_path, request):
    if quant != "none":
        pytest.importorskip("bitsandbytes")
    model = "random:tiny-llama" if source == "random" else str(request.getfixturevalue("checkpoint"))
    monkeypatch.setattr("zobench.cell.pipeline.cache_dir", lambda: tmp_path / "streamed")
    streamed = Pipeline(CellConfig.from_dict(cell(method, model, quant)))
    assert streamed.check_supported() is None and streamed.streams()
    a = streamed.run()
    assert a.ok, a.reason
    assert a.metrics.get("quant_streamed") is (True if quant != "none" else None)
    if method == "sensitive":
        assert a.metrics.get("mask_route") == "layer by layer"

    monkeypatch.setattr("zobench.cell.pipeline.cache_dir", lambda: tmp_path / "whole")  # its own mask
    monkeypatch.setattr(Pipeline, "streams", lambda self: False)
    whole = Pipeline(CellConfig.from_dict(cell(method, model, quant)))
    b = whole.run()
    assert b.ok, b.reason
    assert b.metrics.get("quant_streamed") is None and b.metrics.get("mask_cache_hit") is False
    if method == "sensitive":
        assert b.metrics.get("mask_route") == "whole model"

    ma, mb = streamed.run_state.mask, whole.run_state.mask
    assert list(ma) == list(mb) and all(torch.equal(ma[n], mb[n]) for n in ma)
    assert a.metrics.get("mask_nnz") == b.metrics.get("mask_nnz") > 0
    if method == "sensitive":
        assert a.metrics.get("sqgrad_mass_frac") == pytest.approx(b.metrics.get("sqgrad_mass_frac"), rel=1e-5)
    # The same sparse values beside the same 4-bit layers, so the same training, step for step.
    va, vb = streamed.run_state.vectors or [], whole.run_state.vectors or []
    assert [n for n, _ in va] == [n for n, _ in vb] and (quant == "none" or va)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(va, vb))
    pa, pb = dict(streamed.run_state.model.named_parameters()), dict(whole.run_state.model.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)  # the trained models too
    assert a.metrics.get("loss_curve") == b.metrics.get("loss_curve")
    assert streamed.base_fingerprint == whole.base_fingerprint


def test_a_cached_mask_trains_as_the_one_just_built_whatever_the_order_of_its_names():
    """The trainable values beside 4-bit layers are in the layers' order, not the mask's (a mask read back from
    the cache comes sorted by name: layers.10 before layers.2), so the same directions move the same values."""
    pytest.importorskip("bitsandbytes")
    from zobench.quant import QuantContext, get_backend, quantize_model

    orders = []
    for reverse in (False, True):
        model = load_model("random:tiny-llama", seed=SEED).model
        params = M.scoped_params(model, "linear")
        mask = M.random_mask(params, 0.01, seed=0)
        if reverse:
            mask = dict(reversed(list(mask.items())))
        vectors = quantize_model(model, get_backend("nf4"), QuantContext(), M.linear_layers(model), mask)
        orders.append([(n, v.clone()) for n, v in vectors])
    assert [n for n, _ in orders[0]] == [n for n, _ in orders[1]] == \
        [f"{m}.values" for m in M.linear_layers(load_model("random:tiny-llama", seed=SEED).model)]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*orders))


def test_a_checkpoint_that_is_not_safetensors_is_not_streamed(tmp_path):
    from zobench.models.shards import tensor_files

    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    assert tensor_files(tmp_path) is None
