"""Gate: gptqmodel (``zobench[gptq]``), imported when a model is quantized with GPTQ.

Its import sets process-wide settings that would change what this benchmark measures; they are undone
here (see ``load``).
"""

from __future__ import annotations

import os


def load():
    """The parts of gptqmodel the gptq backend uses, ``(GPTQ, GPTQConfig, TorchLinear, hf_pack_layer)``, without
    the process-wide settings its import makes."""
    # Its import sets PYTORCH_ALLOC_CONF (expandable CUDA segments) and CUDA_DEVICE_ORDER when unset;
    # either would change the memory this benchmark measures, or which GPU is which.
    saved = {k: os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "CUDA_DEVICE_ORDER")}
    # Its CPU worker pool defaults to (cores + 1) // 2, one worker on a 2-core machine, too few for its
    # model-level quantizer there. The per-layer path never starts the pool; this is for any other
    # gptqmodel call in the process.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    try:
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
        from gptqmodel.quantization.config import GPTQConfig
        from gptqmodel.quantization.gptq import GPTQ as LayerGPTQ
        from gptqmodel.utils.packing import hf_pack_layer
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
    return LayerGPTQ, GPTQConfig, TorchLinear, hf_pack_layer
