"""Random models drawn tensor by tensor (zobench.models.stream): seeded per tensor, transformers' init, and
quantized one layer at a time in a cell without the float model ever existing whole."""

from __future__ import annotations

import json

import pytest
import torch

from zobench.errors import UserError
from zobench.gates.transformers import AutoModelForCausalLM
from zobench.models import load_model
from zobench.models.load import random_config, shipped_configs
from zobench.models.stream import check_drawable, empty_model
from zobench.zo import fused


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def test_a_random_model_is_the_same_whatever_the_threads_order_or_implementation_that_draw_it():
    a = load_model("random:tiny-llama", seed=3).model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model("random:tiny-llama", seed=3, defer_linears=True)
    finally:
        torch.set_num_threads(threads)
    assert loaded.deferred is not None and len(loaded.deferred.names) == 14  # 2 blocks x 7 linears
    assert all(p.device.type == "meta" for p in loaded.model.model.layers[0].mlp.parameters())
    loaded.deferred.names.reverse()  # drawn last to first
    with fused.torch_fallback():  # the torch ops a GPU draws with, instead of the C library
        assert len(list(loaded.deferred.arrive(loaded.model))) == 14
    assert_same(a, loaded.model)
    c = load_model("random:tiny-llama", seed=4).model
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_a_random_model_has_the_init_transformers_gives_its_architecture():
    ours = load_model("random:tiny-llama", seed=0).model
    config = random_config("tiny-llama", False)
    torch.manual_seed(0)
    theirs = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ta, tb = tensors(ours), tensors(theirs)
    assert ta.keys() == tb.keys()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied as transformers ties it
    std = config.initializer_range
    for name, t in ta.items():
        ref = tb[name]
        assert t.shape == ref.shape and t.dtype == ref.dtype, name
        if name.endswith("norm.weight") or "rotary" in name:  # ones, and the rotary frequencies: exactly
            assert torch.equal(t, ref), name
        else:  # normal(0, initializer_range)
            assert abs(t.std().item() - std) < 0.1 * std and abs(t.mean().item()) < 0.1 * std, name
    pad = config.pad_token_id
    assert not ours.model.embed_tokens.weight[pad].any() and not theirs.model.embed_tokens.weight[pad].any()


def test_the_shipped_architectures_are_drawable_and_one_with_its_own_init_is_refused(tmp_path):
    for name in shipped_configs():  # checked on the meta device: no memory, even at 13B
        check_drawable(empty_model(random_config(name, False), torch.float16), name)
    config = {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="initialises its weights its own way") as e:
        load_model(f"random:{tmp_path / 'config.json'}")
    assert "\n" not in str(e.value)


def nf4_cell(method: str, steps: int = 1) -> dict:
    return {"model": "random:tiny-llama", "task": "sst2", "method": method, "quant": "nf4", "n_train": 8,
            "n_dev": 0, "n_test": 0, "batch_size": 4, "max_length": 32, "steps": steps, "warmup_steps": 0,
            "eval_before": False, "eval_after": False, "device": "cpu", "seed": 5}


def test_a_streamed_nf4_cell_runs_and_equals_the_float_model_quantized_after():
    pytest.importorskip("bitsandbytes")
    from zobench.cell.pipeline import Pipeline
    from zobench.quant import QuantContext, get_backend, quantize_model
    from zobench.spec.config import CellConfig
    from zobench.zo.masks import linear_layers

    pipeline = Pipeline(CellConfig.from_dict(nf4_cell("forward", steps=2)))
    rec = pipeline.run()
    assert rec.ok, rec.reason
    assert rec.metrics.get("quant_streamed") is True and rec.metrics.get("weights_init") == "per-tensor philox"
    assert {"load", "quantize", "train"} <= set(rec.phases)
    assert rec.metrics.get("steps_done") == 2 and rec.metrics.get("final_loss") is not None
    streamed = pipeline.run_state.model

    float_model = load_model("random:tiny-llama", seed=5).model  # the same values, whole, quantized after
    names = linear_layers(float_model)
    quantize_model(float_model, get_backend("nf4"), QuantContext(), names)
    nf4 = get_backend("nf4")
    for name in names:
        a, b = streamed.get_submodule(name), float_model.get_submodule(name)
        assert type(a).__name__ == "Linear4bit" and not a.support_avx512bf16_for_cpu
        assert torch.equal(a.weight.data, b.weight.data), name  # the 4-bit codes
        assert torch.equal(nf4.dequantize(a), nf4.dequantize(b)), name  # and their scales
    rest = {n: t for n, t in tensors(float_model).items() if not any(n.startswith(f"{q}.") for q in names)}
    assert all(torch.equal(t, tensors(streamed)[n]) for n, t in rest.items())


def test_a_mask_method_that_needs_the_float_values_keeps_the_float_model_until_its_mask_is_taken():
    pytest.importorskip("bitsandbytes")
    from zobench.cell.pipeline import Pipeline
    from zobench.quant import get_backend
    from zobench.spec.config import CellConfig

    # Only a backend that quantizes each layer from its own weight can take layers as they are drawn.
    assert get_backend("nf4").per_layer and not get_backend("gptq").per_layer and not get_backend("none").per_layer
    pipeline = Pipeline(CellConfig.from_dict({**nf4_cell("magnitude"), "density": 0.01}))
    assert pipeline.check_supported() is None and not pipeline.streams()
    rec = pipeline.run()
    assert rec.ok, rec.reason
    assert rec.metrics.get("quant_streamed") is None and rec.metrics.get("weights_init") == "per-tensor philox"
