"""LoRA configs that peft can apply next to the optional gptq backend.

The gptq backend installs gptqmodel with --no-deps; peft then finds it without the optimum it requires
and raises ImportError from its AWQ/GPTQ dispatchers for every layer, so no LoRA could be made at all.
Registering the ordinary LoRA Linear as a custom module answers nn.Linear before those dispatchers run.
Only then: the custom mapping also catches Linear subclasses (bitsandbytes' 4-bit layers), which peft's
own dispatch must keep handling where it works.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError

from zobench.errors import UserError
from zobench.gates import peft


def dispatchable(config):
    """``config`` (a peft ``LoraConfig``), made to wrap plain Linear layers itself when peft's layer
    dispatch would raise."""
    LoraLinear, is_gptqmodel_available = peft.lora_linear()
    try:
        is_gptqmodel_available()
    except ImportError:
        config._register_custom_module({torch.nn.Linear: LoraLinear})
    return config


def add_lora(model, r: int, alpha: int, targets, seed: int | None = None):
    """``model`` wrapped by peft with a fresh LoRA adapter (dropout 0) on the ``targets`` linears; only the
    adapter requires grad. peft draws the A matrices from torch's CPU generator: with ``seed``, from that
    generator seeded for this call only (the caller's random state is left as it was)."""
    lib = peft.load()
    config = dispatchable(lib.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    if seed is None:
        return lib.get_peft_model(model, config)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return lib.get_peft_model(model, config)


def load_adapter(loaded, path: str | Path):
    """Put the LoRA adapter saved at ``path`` on ``loaded.model`` (in eval mode) and return the peft model.

    An adapter is data (docs/security.md): its config is checked first (``cell.delta_check.check_adapter``:
    JSON, no module named to import, safetensors weights), and anything peft then rejects (a rank that is
    not a number, target modules the model lacks, a damaged weights file) is one line naming the folder."""
    lib = peft.load()
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{path}: no adapter_config.json (not a saved LoRA adapter)")
    try:
        config = dispatchable(lib.LoraConfig.from_pretrained(str(path)))
        loaded.model = lib.PeftModel.from_pretrained(loaded.model, str(path), config=config).eval()
    # (ImportError: a config whose target modules match a layer type peft serves through an optional package)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, OSError, SafetensorError,
            ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: not a LoRA adapter this model can load ({type(e).__name__}: {first})") from None
    return loaded.model
