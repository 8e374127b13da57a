"""Quantization backends and the dense-and-sparse path.

``quant: <name>`` in a suite names one of ``spec.catalog.QUANT_NAMES``; this registry maps each to its
backend class. Each backend is one file with the same shape (see ``base.Backend``) and one line in
``CLASSES``; its optional package is imported through its gate (``zobench.gates``) only when a layer is
quantized, and a missing package is reported as one line saying how to install it
(``Backend.check_available``).
"""

from __future__ import annotations

from zobench.gates.hide import hide_unused
from zobench.quant.base import Backend, NoQuant, QuantContext, quantize_model
from zobench.quant.bnb import FP4, NF4, FP4Plain, Int8, NF4Plain
from zobench.quant.gptq import GPTQ
from zobench.quant.hqq import HQQ
from zobench.registry import Registry
from zobench.spec.catalog import PLAIN_SCALES, QUANT_NAMES

CLASSES = {"none": NoQuant, "nf4": NF4, "fp4": FP4, "int8": Int8, "gptq": GPTQ, "hqq": HQQ}
CLASSES["nf4-plain"], CLASSES["fp4-plain"] = NF4Plain, FP4Plain
if set(CLASSES) != set(QUANT_NAMES):  # a declared backend without a class, or a class declared nowhere
    raise ImportError(f"quant backends declared {sorted(QUANT_NAMES)} but implemented {sorted(CLASSES)}")
if {name for name, cls in CLASSES.items() if cls.scales is not None} != set(PLAIN_SCALES):
    raise ImportError(f"backends declared with plain scales {sorted(PLAIN_SCALES)} differ from those with scales()")

BACKENDS = Registry("quant backend")
for _name in QUANT_NAMES:
    BACKENDS.register(_name, CLASSES[_name])


def get_backend(name: str) -> Backend:
    """A backend instance by its short name (did-you-mean on a typo)."""
    return BACKENDS.get(name)()


def hide_others(name: str) -> list[str]:
    """In a cell's own process: hide the optional packages of every backend but ``name`` from the import
    system (``gates.hide``), so peft and transformers cannot import them. Returns the names hidden."""
    optional = {m for q in QUANT_NAMES for m in get_backend(q).requires}
    return hide_unused(get_backend(name).requires, optional)


__all__ = ["BACKENDS", "QUANT_NAMES", "Backend", "QuantContext", "get_backend", "hide_others", "quantize_model"]
