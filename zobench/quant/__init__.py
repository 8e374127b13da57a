"""Quantization backends and the dense-and-sparse path.

``quant: <name>`` in a suite resolves here. Each backend is one file with the same shape (see
``base.Backend``) and one line in ``BACKENDS``; its module (and its optional package) is imported only when
the backend is asked for, so validating a suite imports no torch, and a missing package is reported as one
line saying how to install it.
"""

from __future__ import annotations

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
_LAZY = {"Backend", "QuantContext", "quantize_model"}


def get_backend(name: str):
    """A backend instance by its short name (did-you-mean on a typo); imports its module lazily."""
    return BACKENDS.get(name)()


def __getattr__(name):
    if name in _LAZY:
        from zobench.quant import base

        return getattr(base, name)
    raise AttributeError(f"module 'zobench.quant' has no attribute '{name}'")


__all__ = ["BACKENDS", "QUANT_NAMES", "Backend", "QuantContext", "get_backend", "quantize_model"]
