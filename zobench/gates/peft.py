"""Gate: peft, imported when a LoRA is made or loaded.

peft's own import pulls in bitsandbytes and hqq (and through hqq torch's compiler) wherever they are
installed: about 30 MiB and seconds in every process that imports it, so a cell that trains no LoRA never
does (``gates.hide`` keeps the rest away from one that does).
"""

from __future__ import annotations


def load():
    """The peft package (``LoraConfig``, ``PeftModel``, ``get_peft_model``)."""
    import peft

    return peft


def lora_linear():
    """``(peft's LoRA Linear layer, its gptqmodel probe)``, for ``models.lora.dispatchable``."""
    from peft.import_utils import is_gptqmodel_available
    from peft.tuners.lora.layer import Linear

    return Linear, is_gptqmodel_available
