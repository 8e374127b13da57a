"""LoRA configs that peft can apply next to the optional gptq backend.

The gptq backend installs gptqmodel with --no-deps; peft then finds it without the optimum it requires
and raises ImportError from its AWQ/GPTQ dispatchers for every layer, so no LoRA could be made at all.
Registering the ordinary LoRA Linear as a custom module answers nn.Linear before those dispatchers run.
Only then: the custom mapping also catches Linear subclasses (bitsandbytes' 4-bit layers), which peft's
own dispatch must keep handling where it works.
"""

from __future__ import annotations

import torch


def dispatchable(config):
    """``config`` (a peft ``LoraConfig``), made to wrap plain Linear layers itself when peft's layer
    dispatch would raise."""
    from peft.import_utils import is_gptqmodel_available
    from peft.tuners.lora.layer import Linear as LoraLinear

    try:
        is_gptqmodel_available()
    except ImportError:
        config._register_custom_module({torch.nn.Linear: LoraLinear})
    return config
