"""Gate: hqq (``zobench[hqq]``), imported when a layer is quantized with it.

hqq imports torch's compiler (``torch._inductor``) at its import: seconds and memory no other cell pays.
"""

from __future__ import annotations


def quantizer():
    """``(BaseQuantizeConfig, HQQLinear)`` of ``hqq.core.quantize``."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    return BaseQuantizeConfig, HQQLinear
