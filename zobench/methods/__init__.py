"""Fine-tuning methods as plug-ins: one file each, registered at definition (see ``base``).

Adding a method is one new file in this folder (a ``Method`` subclass with ``@register``) and one import
line below. Its module must not import torch at import time: the registry is read when a suite is
validated.
"""

from zobench.methods import fo, forward, full, lezo, masked  # noqa: E402,F401  (registration)
from zobench.methods.base import METHODS, Method, Price, PriceInputs, get_method, method_settings, register

__all__ = ["METHODS", "Method", "Price", "PriceInputs", "get_method", "method_settings", "register"]
