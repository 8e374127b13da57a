"""The shape every fine-tuning method's implementation has, and the registry that holds them.

A method is declared in ``zobench.spec.catalog`` (its family, whether it needs a mask, whether it runs
beside quantized weights, its settings: pure data the spec and the readers need) and implemented by one
class in one file under ``zobench/methods/``, registered by ``@register`` at its definition (PEFT's
``register_peft_method``, lm-evaluation-harness's ``register_model``). The decorator refuses a name the
catalog does not declare, a second method of the same name, and a class that lacks a hook its declaration
asks for. Everything outside this package asks the method instead of testing its name:

    info          its declaration (``spec.catalog.MethodInfo``)
    build_mask    ``(mask, info)``: the static mask of the entries it trains (``needs_mask`` methods)
    build_stepper the object whose ``step(batch, i)`` runs one training step
    price         what it keeps besides the weights, for the memory estimator

Method modules import the engine (``zobench.zo``, torch) at their top: nothing that validates a suite or
reads records imports them, since what those need is the declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from zobench.registry import Registry
from zobench.spec import catalog
from zobench.spec.catalog import MethodInfo

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
    """Base class: subclasses set ``name`` (declared in ``spec.catalog``) and implement ``build_stepper`` and
    ``price`` (and ``build_mask`` where the declaration says ``needs_mask``)."""

    name: ClassVar[str] = ""
    # what a kept result of a method without a trainable (first-order) is: its adapter (a peft model's, a
    # ``lora`` delta), or the tensors it trained (a ``tensors`` delta)
    keeps_adapter: ClassVar[bool] = False

    @property
    def info(self) -> MethodInfo:
        return catalog.METHODS.get(self.name)

    def build_mask(self, run):
        """``(mask, info)`` for ``needs_mask`` methods (``run`` is the cell's ``cell.pipeline.Run``)."""
        raise NotImplementedError

    def mask_streams(self, cfg) -> bool:
        """Whether ``build_mask`` works on a streamed model, whose block linears are drawn only when asked for
        (``models.stream.Deferred``): then the cell never holds the float model whole."""
        return False

    def build_stepper(self, run):
        """``(stepper, trainable or None)``: ``stepper.step(batch, i)`` runs one step on ``run.model``."""
        raise NotImplementedError

    def price(self, inputs: PriceInputs) -> Price:
        raise NotImplementedError


def streams(cfg, method: Method, backend) -> bool:
    """Whether a cell's block linears wait on the meta device until they are needed (``models.stream``,
    ``models.shards``), so the float model never exists whole before it must: with a quant ``backend`` that
    quantizes each layer from its own weight, each is made in the quantize phase and quantized before the
    next; a float cell whose mask ``method`` builds block by block makes them once the mask is taken. Never
    with a delta to apply to the float weights, or a mask that needs them (``Method.mask_streams``). The
    cell's rule (``cell.pipeline.Pipeline.streams``) and the estimator's (``analysis.estimate``)."""
    needs_mask = cfg.method_info.needs_mask
    if cfg.delta or (needs_mask and not method.mask_streams(cfg)):
        return False
    return needs_mask if backend is None else backend.per_layer


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: check the name and the interface, then register under ``cls.name`` (a duplicate is
    refused)."""
    if not isinstance(cls, type) or not issubclass(cls, Method):
        raise TypeError(f"{cls!r}: a method must subclass zobench.methods.base.Method")
    if cls.name not in catalog.METHODS:
        raise TypeError(f"{cls.__name__}: method '{cls.name}' is not declared in zobench/spec/catalog.py "
                        f"(METHOD_INFO)")
    info = catalog.METHODS.get(cls.name)
    for hook in ("build_stepper", "price") + (("build_mask",) if info.needs_mask else ()):
        if getattr(cls, hook) is getattr(Method, hook):
            raise TypeError(f"method '{cls.name}' ({cls.__name__}) does not implement {hook}()")
    if cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' is registered twice ({cls.__module__}.{cls.__name__})")
    METHODS.register(cls.name, cls)
    return cls


def get_method(name: str) -> Method:
    """The method registered as ``name`` (did-you-mean on a typo)."""
    return METHODS.get(name)()
