"""The shape every fine-tuning method has, and the registry that holds them.

A method is one class in one file under ``zobench/methods/``, registered by ``@register`` at its
definition (PEFT's ``register_peft_method``, lm-evaluation-harness's ``register_model``): the decorator
checks the interface and refuses a second method of the same name. Everything outside this package
asks the method instead of testing its name:

    family        "zo" (forward-only training), "fo" (a backward pass), or "reference" (nothing trained)
    needs_mask    builds a static mask of the entries it trains (``build_mask``): a sparse method
    quantized     can train beside quantized weights (its trained values live outside them)
    settings      config keys that change what this method runs (density, ...): a cell's identity keeps
                  them only for the methods that use them, so a density axis does not duplicate full ZO
    build_stepper the object whose ``step(batch, i)`` runs one training step
    price         what it keeps besides the weights, for the memory estimator

Method modules import torch only inside their functions: validating a suite reads the registry without
loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from zobench.registry import Registry

FAMILIES = ("zo", "fo", "reference")
MASK_SETTINGS = ("density", "per_tensor", "calib_path", "calib_sequences", "calib_length")

METHODS = Registry("method")


@dataclass(frozen=True)
class PriceInputs:
    """What the estimator knows when it asks a method for its price (see ``zobench.analysis.estimate``)."""

    cfg: Any                # the cell's CellConfig
    arch: Any               # the model's shapes (``estimate.Arch``)
    dtype_bytes: int        # bytes per value of the model dtype
    device: str             # "cpu" or "cuda"
    storage: Any            # the quant backend's ``Storage``, or None for unquantized weights
    scope_sizes: tuple      # numel of every tensor in the method's scope
    tokens: int = 0         # tokens in one training batch (sequences x max_length)
    scored_positions: int = 0  # positions of that batch projected onto the vocabulary


@dataclass(frozen=True)
class Price:
    """Bytes a method holds beyond the model's weights and one forward's activations."""

    trainable: float = 0.0    # indices, float32 master copies, values beside quantized layers
    optimizer: float = 0.0    # momentum / Adam state
    update: float = 0.0       # temporaries of the perturb and update passes (run between forwards)
    nnz: int = 0              # values trained
    sparse_delta: bool = False  # a dense-and-sparse layer adds its sparse product during the forward
    nnz_per_layer: float = 0.0
    saved_activations: float = 0.0  # what autograd keeps for a backward pass (first-order methods)


class Method:
    """Base class: subclasses set the class attributes and implement ``build_stepper`` and ``price``."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = "zo"
    needs_mask: ClassVar[bool] = False
    quantized: ClassVar[bool] = False
    default_scope: ClassVar[str] = "linear"
    settings: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""      # one line for tables and --help
    order: ClassVar[int] = 100       # where reports list it (reference first, first-order baselines last)
    color: ClassVar[str | None] = None  # its colour in plots (None: one derived from the name)

    def build_mask(self, run):
        """``(mask, info)`` for ``needs_mask`` methods (``run`` is the cell's ``cell.pipeline.Run``)."""
        raise NotImplementedError

    def build_stepper(self, run):
        """``(stepper, trainable or None)``: ``stepper.step(batch, i)`` runs one step on ``run.model``."""
        raise NotImplementedError

    def price(self, inputs: PriceInputs) -> Price:
        raise NotImplementedError


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: check the interface, then register under ``cls.name`` (a duplicate is refused)."""
    if not isinstance(cls, type) or not issubclass(cls, Method):
        raise TypeError(f"{cls!r}: a method must subclass zobench.methods.base.Method")
    if not cls.name or cls.family not in FAMILIES:
        raise TypeError(f"{cls.__name__}: set name and family (one of {', '.join(FAMILIES)})")
    for hook in ("build_stepper", "price") + (("build_mask",) if cls.needs_mask else ()):
        if getattr(cls, hook) is getattr(Method, hook):
            raise TypeError(f"method '{cls.name}' ({cls.__name__}) does not implement {hook}()")
    if cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' is registered twice ({cls.__module__}.{cls.__name__})")
    METHODS.register(cls.name, cls)
    return cls


def get_method(name: str) -> Method:
    """The method registered as ``name`` (did-you-mean on a typo)."""
    return METHODS.get(name)()


def method_settings() -> set[str]:
    """Every method-specific config key: a cell's identity drops those its own method does not use."""
    return {key for name in METHODS.names() for key in METHODS.get(name).settings}
