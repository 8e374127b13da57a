"""Quant backends and the dense-and-sparse path on the tiny random Llama (CPU, seconds).

bitsandbytes is a core dependency; the GPTQ (gptqmodel) and HQQ tests skip when their optional package
is not installed, and the missing-package message is tested without any of them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cue_task
import pytest
import torch

from zobench.errors import Unsupported, UserError
from zobench.quant import QuantContext, get_backend, quantize_model
from zobench.quant.sparse import SparseDelta, sparse_bypassed, split_selected
from zobench.spec.config import CellConfig
from zobench.zo.masks import linear_layers, random_mask, scoped_params
from zobench.zo.trainable import SparseTrainable

pytest.importorskip("bitsandbytes")

# Relative L2 error of the logits against the float32 model, measured on this tiny random model with
# seed 0: nf4 0.094, fp4 0.157, int8 0.006, gptq 0.109 (4 C4 sequences of 64 tokens; in_features 64 <
# 128 makes each row one group), hqq 0.101 (groups of 64), nf4-plain 0.098. The bounds leave ~1.5x room for other BLAS
# builds; a broken layer (wrong layout, packing or zero point, lost bias, transposed weight) gives
# errors near 1.
REL_ERROR_BOUND = {"nf4": 0.15, "fp4": 0.25, "int8": 0.02, "gptq": 0.16, "hqq": 0.15, "nf4-plain": 0.15,
                   "fp4-plain": 0.25}
PACKAGE = {"nf4": "bitsandbytes", "fp4": "bitsandbytes", "int8": "bitsandbytes", "gptq": "gptqmodel",
           "hqq": "hqq", "nf4-plain": "bitsandbytes", "fp4-plain": "bitsandbytes"}


def _inputs():
    return torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits.float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _ctx(loaded, data_dir, cache_dir=None):
    # Few, short calibration sequences keep GPTQ to about a second on the tiny model.
    return QuantContext(tokenizer=loaded.tokenizer, data_dir=str(data_dir), calib_sequences=4,
                        calib_length=64, vocab_size=loaded.vocab_size, cache_dir=cache_dir)


@pytest.mark.parametrize("name", sorted(REL_ERROR_BOUND))
def test_backend_forward_close_to_float(tiny, data_dir, name):
    pytest.importorskip(PACKAGE[name])
    ids = _inputs()
    ref = _logits(tiny.model, ids)
    head = tiny.model.get_output_embeddings()
    head_weight, embed = head.weight.clone(), tiny.model.get_input_embeddings()
    embed_weight = embed.weight.clone()
    names = linear_layers(tiny.model)
    before = {n for n, m in tiny.model.named_modules() if type(m) is torch.nn.Linear}
    quantize_model(tiny.model, get_backend(name), _ctx(tiny, data_dir), linear_layers(tiny.model))
    err = _rel(_logits(tiny.model, ids), ref)
    assert 0 < err < REL_ERROR_BOUND[name]
    # Exactly the named block linears became quantized layers, under the same names.
    quantized = type(tiny.model.get_submodule(names[0]))
    assert quantized is not torch.nn.Linear
    for n in names:
        assert type(tiny.model.get_submodule(n)) is quantized
    after = {n for n, m in tiny.model.named_modules() if type(m) is torch.nn.Linear}
    assert after == before - set(names)
    # The head and the embeddings are the same modules with the same float32 weights.
    assert tiny.model.get_output_embeddings() is head and torch.equal(head.weight, head_weight)
    assert tiny.model.get_input_embeddings() is embed and torch.equal(embed.weight, embed_weight)
    assert embed.weight.dtype == torch.float32


def test_gptq_second_run_hits_the_cache(data_dir, tmp_path):
    pytest.importorskip("gptqmodel")
    from zobench.models import load_model

    ids = _inputs()
    outputs, infos = [], []
    for _ in range(2):
        loaded = load_model("random:tiny-llama", dtype="float32", seed=0)
        ctx = _ctx(loaded, data_dir, tmp_path)
        quantize_model(loaded.model, get_backend("gptq"), ctx, linear_layers(loaded.model))
        outputs.append(_logits(loaded.model, ids))
        infos.append(ctx.info)
    assert [i["quant_cache_hit"] for i in infos] == [False, True]
    assert all(isinstance(i["quant_s"], float) for i in infos)
    assert torch.equal(outputs[0], outputs[1])
    entries = list((tmp_path / "gptq").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no temporary directory left


def test_a_gptq_cache_hit_installs_the_files_tensors_a_layer_at_a_time_without_a_second_copy(data_dir, tmp_path,
                                                                                            monkeypatch):
    """Loading the cached layers takes each layer's tensors from the file as its buffers, a layer at a time:
    reading the whole file first and copying into fresh buffers held every layer twice, and SmolLM2's cells
    that loaded the cache trained ~50 MiB above those that had quantized (results/bench/measurements.md)."""
    pytest.importorskip("gptqmodel")
    import gc
    import weakref

    import zobench.quant.gptq as gptq
    from zobench.models import load_model

    loaded = load_model("random:tiny-llama", dtype="float32", seed=0)
    quantize_model(loaded.model, get_backend("gptq"), _ctx(loaded, data_dir, tmp_path), linear_layers(loaded.model))
    reads, opened = [], gptq.safe_open

    class Watched:  # the file as gptq opens it, every tensor it hands out remembered (weakly)
        def __init__(self, *args, **kwargs):
            self.f = opened(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            t = self.inner.get_tensor(key)
            reads.append((key, weakref.ref(t)))
            return t

    monkeypatch.setattr(gptq, "safe_open", Watched)
    again = load_model("random:tiny-llama", dtype="float32", seed=0)
    ctx = _ctx(again, data_dir, tmp_path)
    names = linear_layers(again.model)
    quantize_model(again.model, get_backend("gptq"), ctx, names)
    gc.collect()
    assert ctx.info["quant_cache_hit"] is True
    # in the order of the layers, a layer's tensors together
    assert [k.rpartition(".")[0] for k, _ in reads] == sorted((k.rpartition(".")[0] for k, _ in reads),
                                                              key=names.index)
    # Each tensor read is the installed layer's buffer itself, so none is held twice; the float16 scales
    # (1/32 of the codes' bytes) the kernel's post_init remakes, and the file's copy of them is gone.
    assert {k.rpartition(".")[2] for k, _ in reads} == {"qweight", "qzeros", "scales", "g_idx"}
    for key, ref in reads:
        layer, _, buffer = key.rpartition(".")
        if buffer == "scales":
            assert ref() is None, key
        else:
            assert ref() is not None and ref() is getattr(again.model.get_submodule(layer), buffer), key
    assert torch.equal(_logits(again.model, _inputs()), _logits(loaded.model, _inputs()))


def test_a_cells_quantize_phase_holds_no_replaced_float_weight(monkeypatch, tmp_path):
    """Once the backend has replaced a layer, its float weight is gone: nothing in the cell keeps it. GPTQ
    writes each layer's quantized-dequantized weight into that float weight (a fresh tensor, where a
    checkpoint's was mapped), so a reference kept to the end of the phase cost SmolLM2's GPTQ cells the whole
    model again, 405 MiB (results/bench/measurements.md)."""
    pytest.importorskip("gptqmodel")
    import gc
    import weakref

    from zobench.cell.pipeline import Pipeline
    from zobench.quant.gptq import GPTQ

    monkeypatch.setenv("ZOBENCH_CACHE", str(tmp_path))  # quantized here, not read from an earlier test's cache
    alive = []
    quantize = GPTQ.quantize

    def watched(self, model, names, ctx):
        weights = [weakref.ref(model.get_submodule(n).weight) for n in names]
        quantize(self, model, names, ctx)
        gc.collect()
        alive.append(sum(w() is not None for w in weights))

    monkeypatch.setattr(GPTQ, "quantize", watched)
    cfg = {"model": "random:tiny-llama", "task": "sst2", "method": "forward", "quant": "gptq", "n_train": 8,
           "n_dev": 0, "n_test": 0, "batch_size": 4, "max_length": 32, "steps": 1, "warmup_steps": 0,
           "eval_before": False, "eval_after": False, "device": "cpu", "calib_sequences": 4, "calib_length": 64}
    rec = Pipeline(CellConfig.from_dict(cfg)).run()
    assert rec.ok, rec.reason
    assert alive == [0]


def test_gptq_cache_key_follows_the_weights(tiny, data_dir, tmp_path):
    """Weights changed before quantizing (the dense-and-sparse path zeroes entries) give a new entry."""
    pytest.importorskip("gptqmodel")
    from zobench.models import load_model

    quantize_model(tiny.model, get_backend("gptq"), _ctx(tiny, data_dir, tmp_path), linear_layers(tiny.model))
    other = load_model("random:tiny-llama", dtype="float32", seed=0)
    other.model.get_submodule(linear_layers(other.model)[0]).weight.data[0, :8] = 0
    ctx = _ctx(other, data_dir, tmp_path)
    quantize_model(other.model, get_backend("gptq"), ctx, linear_layers(other.model))
    assert ctx.info["quant_cache_hit"] is False
    assert len(list((tmp_path / "gptq").iterdir())) == 2


def _dense_reference(flat, values, out_f, in_f):
    w = torch.zeros(out_f * in_f, dtype=values.dtype)
    w[flat] = values
    return w.view(out_f, in_f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_product_matches_dense_without_building_it(dtype, monkeypatch):
    import zobench.quant.sparse as sp

    g = torch.Generator().manual_seed(0)
    out_f, in_f, nnz = 48, 40, 90
    flat = torch.randperm(out_f * in_f, generator=g)[:nnz].sort().values
    values = torch.randn(nnz, generator=g)
    layer = SparseDelta(torch.nn.Identity(), flat, values, in_f, out_f, dtype)
    # The layer's own order of values maps back to the same entries.
    back = layer.flat_index()
    assert sorted(back.tolist()) == flat.tolist()
    x = torch.randn(7, in_f, generator=g).to(dtype)
    ref = x.float() @ _dense_reference(back, layer.values.float(), out_f, in_f).T
    monkeypatch.setattr(sp, "GATHER_LIMIT", 2 * nnz)  # several row chunks in the gather path
    got = layer.sparse_product(x).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got, ref, atol=tol, rtol=tol)
    # Both ways agree where both run (CSR has no bfloat16 kernel on the CPU): a GPU may pick either.
    ways = [layer.gather_product] + ([layer.csr_product] if dtype == torch.float32 else [])
    for way in ways:
        assert torch.allclose(way(x).float(), ref, atol=tol, rtol=tol), way.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_and_sparse_equals_dense_when_nothing_is_quantized(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=True).to(dtype)
    x = torch.randn(3, 5, 64).to(dtype)
    ref = lin(x).float()
    model = torch.nn.Sequential(lin)
    mask = {"0.weight": torch.randperm(64 * 96)[:200].sort().values}
    taken = split_selected(model, mask)
    assert int((lin.weight.view(-1)[mask["0.weight"]] != 0).sum()) == 0  # taken out of the dense part
    idx, vals = taken["0"]
    wrapped = SparseDelta(lin, idx, vals, 64, 96, dtype)
    got = wrapped(x).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, ref, atol=tol, rtol=tol)
    # bypassed (a ZO cell's reference forward): the dense part alone, then the sum again
    holder = torch.nn.Sequential(wrapped)
    with sparse_bypassed(holder):
        assert torch.equal(holder(x), lin(x))
    assert torch.equal(holder(x), got.to(dtype))


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_zo_perturb_and_restore_on_sparse_values_is_exact(tiny, name):
    params = scoped_params(tiny.model, "linear")
    mask = random_mask(params, 0.01, seed=0)
    vectors = quantize_model(tiny.model, get_backend(name), QuantContext(), linear_layers(tiny.model), mask)
    assert sum(v.numel() for _, v in vectors) == sum(i.numel() for i in mask.values())
    ids = _inputs()
    before_logits = _logits(tiny.model, ids)
    before = [v.clone() for _, v in vectors]
    trainable = SparseTrainable.of_vectors(vectors)
    trainable.apply(seed=7, scale=0.5)
    moved = _logits(tiny.model, ids)
    assert not torch.equal(moved, before_logits)  # the sparse values take part in the forward
    trainable.apply(seed=7, scale=-0.5)
    trainable.restore()
    assert all(torch.equal(v, b) for (_, v), b in zip(vectors, before))
    assert torch.equal(_logits(tiny.model, ids), before_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_the_sparse_values_into_the_dequantized_nf4_weight_equals_the_separate_product(dtype):
    """quant.sparse's "merge" way: ``x @ (D + S)^T`` against ``D(x) + x @ S^T``, both against the dense
    reference, and ZO's in-place moves of the values take part in it."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    out_f, in_f = 96, 128
    lin = torch.nn.Linear(in_f, out_f, bias=True)
    holder = torch.nn.Sequential(lin)
    mask = {"0.weight": torch.randperm(out_f * in_f)[:300].sort().values}
    idx, values = split_selected(holder, mask)["0"]
    nf4 = get_backend("nf4")
    base = nf4.quantize_linear(lin, QuantContext(dtype=dtype))
    separate = SparseDelta(base, idx, values, in_f, out_f, dtype)
    merged = SparseDelta(base, idx, values, in_f, out_f, dtype, nf4.dequantize)
    assert merged.way == "merge" and separate.way in ("csr", "gather")
    assert sorted(merged.flat_index().tolist()) == idx.tolist()
    # One order of values on every way: a direction seed's z moves the same weights whichever way a device
    # takes (before, the CSR way kept them in column order, so one seed trained other weights there).
    assert torch.equal(merged.flat_index(), separate.flat_index()) and torch.equal(merged.values, separate.values)
    x = torch.randn(2, 5, in_f).to(dtype)
    dense = nf4.dequantize(base).float().view(-1)
    dense[merged.flat_index()] += merged.values.float()
    ref = x.float() @ dense.view(out_f, in_f).T + lin.bias.float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        assert torch.allclose(merged(x).float(), ref, atol=tol, rtol=tol)
        assert torch.allclose(separate(x).float(), ref, atol=tol, rtol=tol)
        merged.values.mul_(3)  # what a ZO perturbation does to the live values
        assert not torch.allclose(merged(x).float(), ref, atol=tol, rtol=tol)
        merged.values.div_(3)
        assert torch.allclose(merged(x).float(), ref, atol=tol, rtol=tol)
        z = torch.randn(merged.nnz).to(dtype)
        for layer in (merged, separate):
            layer.values.add_(z)
        assert torch.allclose(merged(x).float(), separate(x).float(), atol=tol, rtol=tol)
        assert not torch.allclose(merged(x).float(), ref, atol=tol, rtol=tol)
        with sparse_bypassed(torch.nn.Sequential(merged)):  # the quantized layer alone
            assert torch.equal(merged(x), base(x))


def test_a_4bit_dense_and_sparse_layer_merges_and_bitsandbytes_never_repacks_it():
    """A 4-bit layer merges S into its dequantized weight on every CPU: bitsandbytes' AVX512-BF16 repack (at
    the first eval forward) is switched off, so the weight stays dequantizable after eval forwards. An 8-bit
    layer (no dense weight in its forward) always keeps the separate product."""
    pytest.importorskip("bitsandbytes")
    from zobench.cell.pipeline import Pipeline
    from zobench.models import load_model

    model = load_model("random:tiny-llama", seed=0).model
    mask = random_mask(scoped_params(model, "linear"), 0.01, seed=0)
    quantize_model(model, get_backend("int8"), QuantContext(), linear_layers(model), mask)
    assert {m.way for m in model.modules() if isinstance(m, SparseDelta)} == {"csr"}
    model = load_model("random:tiny-llama", seed=0).model
    quantize_model(model, get_backend("nf4"), QuantContext(), linear_layers(model), mask)
    assert {m.way for m in model.modules() if isinstance(m, SparseDelta)} == {"merge"}
    model.eval()
    with torch.inference_mode(), sparse_bypassed(model):  # the bitsandbytes layers' own eval forward
        model(input_ids=torch.randint(0, 100, (2, 16)))
    states = [m.base.weight.quant_state for m in model.modules() if isinstance(m, SparseDelta)]
    assert states and not any(getattr(s, "packing_format_for_cpu", False) for s in states)
    # A cell says which way its layers took.
    cfg = {"model": "random:tiny-llama", "task": "sst2", "method": "random", "quant": "nf4", "density": 0.01,
           "n_train": 8, "n_dev": 0, "n_test": 0, "batch_size": 4, "max_length": 32, "steps": 1,
           "warmup_steps": 0, "eval_before": False, "eval_after": False, "device": "cpu"}
    rec = Pipeline(CellConfig.from_dict(cfg)).run()
    assert rec.ok, rec.reason
    assert rec.metrics.get("quant_sparse_way") == "merge"


def test_zo_sees_the_4bit_models_own_loss_difference_in_eval_mode():
    """ZO's signal on a 4-bit model is a loss difference at eps's scale. Through zobench's 4-bit layers in eval
    mode (as a step runs) the projected gradient (L+ - L-) / 2 eps is the one of the same model computed in
    float32 from its dequantized weights; bitsandbytes' AVX512-BF16 path, which rounds activations to
    bfloat16, made it mostly rounding (bench/nf4_direction.py: correlation +0.34 on SmolLM2)."""
    pytest.importorskip("bitsandbytes")
    from zobench.models import load_model
    from zobench.quant.sparse import SparseDelta as SD

    backend = get_backend("nf4")
    model = load_model("random:tiny-llama", seed=0).model
    mask = random_mask(scoped_params(model, "linear"), 0.01, seed=0)
    values = [v for _, v in quantize_model(model, backend, QuantContext(), linear_layers(model), mask)]
    model.eval()  # the new 4-bit modules too, as after a cell's first evaluation or reference forward
    layers = [m for m in model.modules() if isinstance(m, SD)]
    ids = torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(0))

    def loss(reference: bool) -> float:
        # the reference: every layer's forward written out as float32 dequantize-scatter-matmul
        for m in layers:
            m.forward = (lambda x, m=m: torch.nn.functional.linear(
                x, backend.dequantize(m.base).index_put((m.flat_index() // m.in_features,
                                                         m.flat_index() % m.in_features), m.values, accumulate=True),
                m.base.bias)) if reference else SD.forward.__get__(m)
        with torch.inference_mode():
            return float(model(input_ids=ids, labels=ids).loss)

    eps, g = 1e-3, {True: [], False: []}
    for k in range(6):
        z = [torch.randint(0, 2, v.shape, generator=torch.Generator().manual_seed(k)).float() * 2 - 1 for v in values]
        for reference in (False, True):
            with torch.no_grad():
                [v.add_(eps * zz) for v, zz in zip(values, z)]
                lp = loss(reference)
                [v.sub_(2 * eps * zz) for v, zz in zip(values, z)]
                lm = loss(reference)
                [v.add_(eps * zz) for v, zz in zip(values, z)]
            g[reference].append((lp - lm) / (2 * eps))
    rms = (sum(x * x for x in g[True]) / len(g[True])) ** 0.5
    assert rms > 0
    assert all(abs(a - b) <= 0.05 * rms for a, b in zip(g[False], g[True])), (g[False], g[True])
    assert not any(getattr(m.base.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_a_repacked_4bit_weight_refuses_to_be_merged():
    """bitsandbytes' AVX512-BF16 layout is not what ``dequantize_4bit`` reads: merging it would be garbage."""
    pytest.importorskip("bitsandbytes")
    lin = torch.nn.Linear(64, 32)
    base = get_backend("nf4").quantize_linear(lin, QuantContext())
    base.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(RuntimeError, match="repacked"):
        get_backend("nf4").dequantize(base)


def test_the_split_keeps_the_selected_values_exactly(tiny):
    """The taken entries live on beside the quantized layer in full precision, unrounded."""
    params = dict(scoped_params(tiny.model, "linear"))
    mask = random_mask(list(params.items()), 0.02, seed=1)
    originals = {n: params[n].detach().view(-1)[i].clone() for n, i in mask.items()}
    quantize_model(tiny.model, get_backend("int8"), QuantContext(), linear_layers(tiny.model), mask)
    for pname, idx in mask.items():
        layer = tiny.model.get_submodule(pname.removesuffix(".weight"))
        assert isinstance(layer, SparseDelta)
        order = torch.argsort(layer.flat_index())
        assert torch.equal(layer.values[order], originals[pname])


def test_full_zo_on_4bit_is_an_unsupported_status_not_a_crash():
    from zobench.cell.pipeline import Pipeline

    for method in ("full", "lezo", "fo-sgd"):  # every method that changes the quantized weights themselves
        cfg = CellConfig.from_dict({"model": "random:tiny-llama", "quant": "nf4", "method": method, "device": "cpu"})
        with pytest.raises(Unsupported, match="cannot move by eps"):
            Pipeline(cfg).check_supported()
    pipeline = Pipeline(CellConfig.from_dict({"quant": "nf4", "method": "sensitive", "device": "cpu"}))
    pipeline.check_supported()
    assert pipeline.backend.name == "nf4"


def test_quant_names_are_validated_with_a_hint():
    with pytest.raises(UserError, match="key 'quant'.*did you mean 'nf4'"):
        CellConfig.from_dict({"quant": "nf5"}, where="s.yaml")
    with pytest.raises(UserError, match="key 'scope'"):
        CellConfig.from_dict({"quant": "nf4", "method": "sensitive", "scope": "all"}, where="s.yaml")


@pytest.mark.parametrize("name", ["nf4", "gptq", "hqq"])
def test_missing_package_is_one_line_with_the_install_command(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a, **k: None if mod == PACKAGE[name] else real(mod, *a, **k))
    backend = get_backend(name)
    with pytest.raises(Unsupported, match=PACKAGE[name]) as e:
        backend.check_available("cpu")
    assert "pip install" in backend.install and backend.install in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_suite_with_a_quant_axis_runs_every_backend_end_to_end(tmp_path, data_dir):
    from zobench.driver import run_suite
    from zobench.results import derive
    from zobench.spec.suite import load_suite

    quants = ["nf4", "int8"] + [q for q in ("gptq", "hqq") if importlib.util.find_spec(q if q != "gptq"
                                                                                               else "gptqmodel")]
    (tmp_path / "q.yaml").write_text(f"""
name: q
defaults: {{model: "random:tiny-llama", data_dir: "{data_dir}", n_train: 16, n_dev: 4, n_test: 8,
           batch_size: 4, max_length: 48, steps: 3, warmup_steps: 1, calib_sequences: 2, calib_length: 32}}
matrix:
  quant: [{", ".join(quants)}]
  method: [sensitive]
  density: [0.02]
timeout_s: 600
""")
    from zobench.results import load_records

    records = load_records(run_suite(load_suite(tmp_path / "q.yaml"), tmp_path / "results"))
    derived = derive(records)
    by = {(r.config["quant"], r.method): r for r in records}
    for q in quants:
        assert by[(q, "forward")].ok, by[(q, "forward")].reason
        rec = by[(q, "sensitive")]
        assert rec.ok, rec.reason
        m = rec.metrics
        assert m.get("trainable_numel") == m.get("mask_nnz") > 0
        assert m.get("restore_drift_frac_changed") == 0.0
        assert "quantize" in rec.phases and derived[rec.cell_id].peak_over_inference > 0


def test_install_hints_name_extras_that_exist():
    """Every `zobench[extra]` that an error message or the README tells users to install is declared."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    extras = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    texts = [p.read_text() for p in (root / "zobench").rglob("*.py")] + [(root / "README.md").read_text()]
    named = {m for t in texts for m in re.findall(r"zobench\[([\w,-]+)\]", t)}
    assert named, "no install hint found: the pattern is wrong"
    for group in named:
        assert set(group.split(",")) <= extras, group


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_plain_4bit_has_the_double_quantized_codes_with_a_float32_absmax_per_64_weights(fmt):
    """nf4-plain (fp4-plain) is nf4 (fp4) without double quantization: the same 4-bit codes, and scales that are
    plain float32 (what QZO perturbs), priced as they are stored."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=False)
    plain_backend = get_backend(f"{fmt}-plain")
    plain = plain_backend.quantize_linear(lin, QuantContext())
    nf4 = get_backend(fmt).quantize_linear(lin, QuantContext())
    state = plain.weight.quant_state
    assert not state.nested and state.absmax.dtype == torch.float32 and state.absmax.numel() == 96 * 128 // 64
    assert nf4.weight.quant_state.nested and nf4.weight.quant_state.absmax.dtype == torch.uint8
    assert torch.equal(plain.weight.data, nf4.weight.data)  # the codes: double quantization changes only scales
    assert plain_backend.scales(plain) is state.absmax
    stored = plain.weight.data.numel() * plain.weight.data.element_size() + state.absmax.numel() * 4
    assert plain_backend.storage.weight_bytes(96, 128) == stored
    assert plain.weight.quant_state.quant_type == fmt
    assert get_backend(fmt).scales is None  # 8-bit codes of scales: nothing plain to perturb


def test_sensitive_zo_on_nf4_learns_a_tiny_task():
    """The claims suite's NF4 cell once never left the majority rate. Here sensitive 1% ZO trains the values kept
    beside a tiny random Llama's NF4 layers (as a cell does: mask from squared gradients of the float model,
    then quantization) on the cue task (tests/cue_task.py). Held-out accuracy must end at least 10 points above
    the majority rate."""
    pytest.importorskip("bitsandbytes")
    from zobench.models import load_model
    from zobench.zo.masks import squared_gradients, topk_mask
    from zobench.zo.optim import make_optimizer
    from zobench.zo.trainer import ZOTrainer

    model = load_model("random:tiny-llama", seed=0).model
    train, test = cue_task.examples(512, 1), cue_task.examples(400, 2)
    params = scoped_params(model, "linear")
    mask = topk_mask(squared_gradients(model, params, [train], cue_task.loss).items(), 0.01)
    vectors = quantize_model(model, get_backend("nf4"), QuantContext(), linear_layers(model), mask)
    model.eval()
    trainer = ZOTrainer(model, SparseTrainable.of_vectors(vectors), make_optimizer("sgd", 0.05), cue_task.loss,
                        1e-3, seed=0)
    before, after = cue_task.train_and_score(trainer, train, test, steps=100)
    majority = cue_task.majority(test)
    assert before < majority + cue_task.MARGIN, (before, majority)  # a task it had to learn
    assert after >= majority + cue_task.MARGIN, (before, after, majority)


def test_an_int8_forward_logs_no_cast_notice(caplog):
    """bitsandbytes logs at every int8 forward that it casts inputs to float16: zobench drops that one line
    (a fact the README states, not something a user can act on), and nothing else of bitsandbytes' logging."""
    pytest.importorskip("bitsandbytes")
    import logging

    layer = get_backend("int8").quantize_linear(torch.nn.Linear(64, 32), QuantContext())
    with caplog.at_level(logging.WARNING):
        layer(torch.randn(2, 64))
        logging.getLogger("bitsandbytes.autograd._functions").warning("another bitsandbytes warning")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("MatMul8bitLt" in m for m in messages), messages
    assert "another bitsandbytes warning" in messages


@pytest.mark.parametrize("name", ["int8", "nf4"])
def test_a_quantized_layer_takes_the_models_mode_so_a_later_eval_changes_no_output(tiny, name):
    """bitsandbytes runs int8 on a CPU by the module's mode: LLM.int8 in eval mode, a float matmul of the
    dequantized weight in training mode. A layer made in training mode inside an eval model ran the second
    until the model's next eval() (a cell's first reference forward), so a cell's forwards changed part-way."""
    model = tiny.model
    assert not model.training
    quantize_model(model, get_backend(name), QuantContext(), linear_layers(model))
    assert not any(m.training for m in model.modules())
    ids = _inputs()
    before = _logits(model, ids)
    model.train()
    model.eval()
    assert torch.equal(_logits(model, ids), before)


_QUANTIZE_RSS = """
import json, sys, torch
from zobench.measure import memory
from zobench.quant import QuantContext, get_backend

backend, ctx = get_backend(sys.argv[1]), QuantContext(device="cpu", dtype=torch.bfloat16)
backend.quantize(torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False)).bfloat16(), ["0"], ctx)  # warm
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(48)]).bfloat16()
memory.release_freed_heap()
start = memory.current_rss_mib()
assert memory._reset_hwm()
backend.quantize(model, [str(i) for i in range(48)], ctx)
print(json.dumps({"start": start, "peak": memory._read_hwm_mib(), "end": memory.current_rss_mib()}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable RSS peak")
@pytest.mark.parametrize("name", ["nf4-plain", "int8", "nf4"])
def test_quantizing_hands_each_freed_float_layer_back_so_the_phase_peaks_at_its_live_memory(name):
    """Under glibc's own malloc settings (a cell's `malloc: glibc`, a user's process) the quantize phase's
    peak is its live memory: each replaced float weight goes back to the OS as the loop goes on, where the
    heap had kept them (SmolLM2's nf4-plain quantize phase peaked at 737-894 MiB in three runs, against an
    estimate of 521 and 527-529 with the trim; int8 585-777 against 563-570). 48 bfloat16 layers of 2 MiB
    each (96 MiB); measured here: peak +15-20 MiB and RSS at the end 47-70 MiB below the start with the trim,
    +25-203 and +14-203 without. In a fresh process without zobench's MALLOC_ settings, the heap's
    state being part of what is measured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _QUANTIZE_RSS, name], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    floats_mib = 48 * 1024 * 1024 * 2 / 2**20
    assert rss["peak"] - rss["start"] < 40, rss  # a layer's float copy and transients at a time, not the heap's
    assert rss["end"] - rss["start"] < -floats_mib / 3, rss  # the float weights went back to the OS
