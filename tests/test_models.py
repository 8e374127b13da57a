"""Model specs: the embedded GGUF default, random-weight architectures, errors."""

from __future__ import annotations

import pytest
import torch

from zobench.errors import UserError
from zobench.models import load_model
from zobench.models.load import builtin_gguf, converted_gguf_dir, shipped_configs


def test_gguf_conversion_and_cached_reload_give_identical_logits(tokenizer):
    from transformers import AutoModelForCausalLM

    gguf = builtin_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cached = load_model("smollm2").model
    assert converted_gguf_dir(gguf).joinpath("model.safetensors").exists()
    ids = tokenizer("The movie was wonderful. It was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(direct(input_ids=ids).logits, cached(input_ids=ids).logits)


def test_random_weights_are_seeded():
    a = load_model("random:tiny-llama", seed=1).model
    b = load_model("random:tiny-llama", seed=1).model
    c = load_model("random:tiny-llama", seed=2).model
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtypes(dtype, expected):
    m = load_model("random:tiny-llama", dtype=dtype)
    assert m.model.model.layers[0].self_attn.q_proj.weight.dtype == expected


def test_shipped_configs_cover_the_big_architectures():
    assert {"llama-2-7b", "llama-2-13b", "mistral-7b", "opt-6.7b", "tiny-llama"} <= set(shipped_configs())
    from transformers import AutoConfig

    from zobench.models.load import random_config

    cfg = random_config("llama-2-7b", False)
    assert isinstance(cfg, type(AutoConfig.for_model("llama")))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (4096, 32, 11008)


@pytest.mark.parametrize("spec,message", [
    ("random:no-such", "no such config"),
    ("/nonexistent/model.gguf", "GGUF file not found"),
    ("someone/not-a-cached-model", "cannot load"),
])
def test_bad_model_specs_give_one_clear_line(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=message) as e:
        load_model(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, message", [
    ("smolm2", "did you mean 'smollm2'"),
    ("random:tiny-lama", "did you mean 'tiny-llama'"),
    ("random:no-such", "no such architecture config"),
    ("gpt2", "unknown model"),
    ("./no/such/dir", "no model directory there"),
    ("/nonexistent/model.gguf", "GGUF file not found"),
    ("", "expected a model name"),
])
def test_model_names_are_checked_without_loading(spec, message):
    from zobench.spec.models import check_model_spec

    with pytest.raises(UserError, match=message) as e:
        check_model_spec(spec, "s.yaml: defaults: key 'model'")
    assert str(e.value).startswith("s.yaml: defaults: key 'model'") and "\n" not in str(e.value)


def test_valid_model_names_pass(tmp_path):
    from zobench.spec.models import check_model_spec

    (tmp_path / "config.json").write_text("{}")
    for spec in ("smollm2", "SmolLM2", "random:tiny-llama", "meta-llama/Llama-2-7b-hf", str(tmp_path)):
        assert check_model_spec(spec, "x") == spec


def test_checking_model_names_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from zobench.spec.models import check_model_spec; check_model_spec('smollm2', 'x'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


HQQ_LATER = """
import sys
import torch
from zobench.models import load_model
from zobench.quant import QuantContext, get_backend

m = load_model("random:tiny-llama")
m.model(input_ids=torch.tensor([[1, 2, 3]]))
assert "hqq" not in sys.modules and "torch._inductor.compile_fx" not in sys.modules, "imported with the model"
q = get_backend("hqq").quantize_linear(torch.nn.Linear(128, 64), QuantContext())
assert "hqq" in sys.modules and q(torch.ones(2, 128)).shape == (2, 64)
"""


@pytest.mark.slow  # CI keeps the hiding of quant packages in the next test
def test_loading_a_model_leaves_hqq_and_its_compiler_imports_to_hqq_cells():
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("hqq") is None:
        pytest.skip("hqq is not installed: nothing would import it")
    r = subprocess.run([sys.executable, "-c", HQQ_LATER], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]


HIDDEN_IN_A_LORA_CELL = """
import importlib.util, sys
import torch
from zobench.quant import QuantContext, get_backend, hide_others

hidden = hide_others("none")
assert set(hidden) >= {"bitsandbytes", "hqq"}, hidden
from peft import LoraConfig, get_peft_model
from zobench.models import load_model

m = load_model("random:tiny-llama")
peft_model = get_peft_model(m.model, LoraConfig(r=2, target_modules=["q_proj"]))
peft_model(input_ids=torch.tensor([[1, 2, 3]]))
loaded = [n for n in ("bitsandbytes", "hqq", "gptqmodel") if sys.modules.get(n) is not None]
assert not loaded, f"imported although the cell quantizes with nothing: {loaded}"
backend = get_backend("hqq")
backend.check_available()  # takes the hiding back for the package this backend needs
q = backend.quantize_linear(torch.nn.Linear(128, 64), QuantContext())
assert sys.modules.get("hqq") is not None and q(torch.ones(2, 128)).shape == (2, 64)
assert importlib.util.find_spec("bitsandbytes") is None, "still hidden"
"""


def test_a_cell_process_hides_the_quant_packages_it_does_not_use_and_a_backend_takes_its_own_back():
    """peft imports bitsandbytes and hqq (and through hqq torch's compiler) whenever they are installed: 30
    MiB more in every LoRA cell. A cell's process hides the ones its quant does not need."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("hqq") is None or importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs hqq and bitsandbytes installed: nothing would import them otherwise")
    r = subprocess.run([sys.executable, "-c", HIDDEN_IN_A_LORA_CELL], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]


def test_random_weights_are_built_on_the_target_device_not_in_host_memory():
    """A random 7B model on the meta device costs no host memory: the weights are made where the model
    runs (on a GPU cell, the GPU), never built on the CPU first and copied (13 GiB and minutes at 7B)."""
    import psutil

    from zobench.models import load_model

    rss = psutil.Process().memory_info().rss
    loaded = load_model("random:llama-2-7b", dtype="float16", device="meta")
    assert all(p.device.type == "meta" for p in loaded.model.parameters())
    assert sum(p.numel() for p in loaded.model.parameters()) > 6e9
    assert (psutil.Process().memory_info().rss - rss) / 2**20 < 1024
