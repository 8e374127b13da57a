"""Quantization backends and the dense-and-sparse path.

``quant: <name>`` in a suite resolves here. Each backend is one file with the same shape (see
``base.Backend``); optional packages are imported only when their backend is asked for, and a missing one
is reported as one line saying how to install it.
"""

from __future__ import annotations

from zobench.quant.base import Backend, QuantContext, quantize_model
from zobench.registry import Registry

BACKENDS = Registry("quant backend")
for _name, _factory in (
    ("none", "zobench.quant.base:NoQuant"),
    ("nf4", "zobench.quant.bnb:NF4"),
    ("fp4", "zobench.quant.bnb:FP4"),
    ("int8", "zobench.quant.bnb:Int8"),
    ("gptq", "zobench.quant.gptq:GPTQ"),
    ("hqq", "zobench.quant.hqq:HQQ"),
):
    BACKENDS.register(_name, _factory)

QUANT_NAMES = tuple(BACKENDS.names())


def get_backend(name: str) -> Backend:
    """A backend instance by its short name (did-you-mean on a typo); imports its module lazily."""
    return BACKENDS.get(name)()


__all__ = ["BACKENDS", "QUANT_NAMES", "Backend", "QuantContext", "get_backend", "quantize_model"]
