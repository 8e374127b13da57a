"""Fine-tuning methods as plug-ins: one file each, registered at definition (see ``base``).

Adding a method is its declaration in ``zobench/spec/catalog.py`` (what it is: family, mask, settings),
one new file in this folder (a ``Method`` subclass with ``@register``: how it runs and its price), and one
import line below. Importing this package checks that every declared method has an implementation.
"""

from zobench.methods import fo, forward, full, lezo, masked, quzo, qzo  # noqa: F401  (registration)
from zobench.methods.base import METHODS, Method, Price, PriceInputs, get_method, register
from zobench.spec.catalog import METHOD_INFO

if {m.name for m in METHOD_INFO} != set(METHODS.names()):
    raise ImportError(f"methods declared in spec.catalog without an implementation: "
                      f"{sorted({m.name for m in METHOD_INFO} - set(METHODS.names()))}")

__all__ = ["METHODS", "Method", "Price", "PriceInputs", "get_method", "register"]
