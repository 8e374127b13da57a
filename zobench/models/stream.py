"""Random-weight models drawn tensor by tensor: the float model is never built whole when the cell quantizes.

A ``random:<config>`` model is built on the meta device (no memory at all), then each tensor is made on the
target device and filled on its own. A tensor's values depend only on the cell's seed and the tensor's
name, never on the device, the thread count or the order tensors are made in: normal values are the
counter-based Philox z of zo/kernels/zo_pass.c (``zo.fused``: the C library on a CPU, the same numbers in
torch ops elsewhere), keyed by a stable hash of (seed, name). ``INIT`` names this generator in the record.

The distributions are those of transformers' default ``PreTrainedModel._init_weights``: linear and embedding
weights normal(0, initializer_range) (an embedding's padding row zero), norm weights one, biases zero.
Architectures whose model class initialises its own way (an ``_init_weights`` of its own), and modules
whose parameters are none of these, are refused before anything is drawn, so no tensor is ever left
uninitialised. Buffers (the rotary embedding's frequencies) are computed by transformers' own
``_init_weights``, as ``from_pretrained`` does after its meta-device build.

A cell that quantizes each layer from its own weight leaves the block linears on the meta device at load
(``defer``) and draws each in its quantize phase right before that layer is quantized (``Deferred.arrive``):
only one float block linear exists at a time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from zobench.errors import UserError
from zobench.gates.transformers import AutoModelForCausalLM, PreTrainedModel
from zobench.zo import fused

INIT = "per-tensor philox"  # what the record says about how a random model's values were drawn


def tensor_seed(seed: int, name: str) -> int:
    """The 64-bit Philox key of tensor ``name`` in a model drawn with ``seed``."""
    digest = hashlib.sha256(f"zobench-random-init\0{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _std(config) -> float:
    """The normal draws' standard deviation, found in the config as transformers' default init finds it."""
    if hasattr(config, "initializer_range"):
        return float(config.initializer_range or 0.02)
    for key in ("init_std", "initializer_factor"):
        if hasattr(config, key):
            return float(getattr(config, key))
    return float(getattr(config.get_text_config(), "initializer_range", 0.02))


def _is_norm(module: nn.Module) -> bool:
    kind = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "LayerNorm" in kind or "RMSNorm" in kind


def _kind(module: nn.Module, attr: str) -> str | None:
    """How parameter ``attr`` of ``module`` is drawn: "normal", "one", "zero", or None (not known)."""
    known = isinstance(module, (nn.Linear, nn.Embedding)) or _is_norm(module)
    if not known:
        return None
    if attr == "bias":
        return "zero"
    if attr == "weight":
        return "one" if _is_norm(module) else "normal"
    return None


def _is_rotary(module: nn.Module) -> bool:
    return "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq")


def check_drawable(model: nn.Module, what: str) -> None:
    """Refuse (``UserError``) a model with a tensor this module cannot draw as transformers would."""
    if type(model)._init_weights is not PreTrainedModel._init_weights:
        raise UserError(f"{what}: {type(model).__name__} initialises its weights its own way; random models are "
                        f"drawn per tensor only for architectures with transformers' default init "
                        f"(llama, mistral, opt, ...)")
    for name, module in model.named_modules():
        for attr in module._parameters:
            if module._parameters[attr] is not None and _kind(module, attr) is None:
                raise UserError(f"{what}: {name}.{attr} ({type(module).__name__}) has no known random init")
        has_buffers = any(b is not None for b in module._buffers.values())
        if has_buffers and (module._parameters or not _is_rotary(module)):
            raise UserError(f"{what}: {name} ({type(module).__name__}) has buffers zobench cannot compute")


@torch.no_grad()
def _draw(module: nn.Module, attr: str, name: str, seed: int, device: torch.device, std: float) -> None:
    """Make parameter ``attr`` of ``module`` (full name ``name``) on ``device`` with its seeded values."""
    meta = module._parameters[attr]
    t = torch.empty(meta.shape, dtype=meta.dtype, device=device)
    kind = _kind(module, attr)
    if kind == "normal":
        t.zero_()
        fused.zpass(t, 0, "gaussian", [(tensor_seed(seed, name), std)])  # 0 + std * z, rounded once to the dtype
        pad = getattr(module, "padding_idx", None)
        if pad is not None:
            t[pad] = 0
    else:
        t.fill_(1.0 if kind == "one" else 0.0)
    module._parameters[attr] = nn.Parameter(t, requires_grad=meta.requires_grad)


@dataclass
class Deferred:
    """Block linears left on the meta device at load: ``arrive`` draws them one at a time."""

    names: list[str]
    seed: int
    device: torch.device
    std: float

    def arrive(self, model: nn.Module) -> Iterator[str]:
        """Draw each deferred linear in place and yield its module name; the caller replaces (quantizes) the
        layer before asking for the next, so at most one of them is float at a time."""
        while self.names:
            name = self.names.pop(0)
            linear = model.get_submodule(name)
            for attr in list(linear._parameters):
                if linear._parameters[attr] is not None:
                    _draw(linear, attr, f"{name}.{attr}", self.seed, self.device, self.std)
            del linear
            yield name


def empty_model(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The architecture of ``config`` on the meta device: shapes and dtypes, no values, no memory."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def draw_model(model: nn.Module, seed: int, device, defer: list[str] = (), what: str = "random model") -> Deferred:
    """Make every tensor of the meta-device ``model`` on ``device`` with its seeded values, but the parameters
    of the linears named in ``defer`` (returned as a ``Deferred`` for ``arrive``). Tied parameters (a head
    sharing the embedding's weight) stay tied."""
    check_drawable(model, what)
    device, std = torch.device(device), _std(model.config)
    deferred = Deferred(list(defer), int(seed), device, std)
    skip = set(defer)
    made: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id of a meta parameter -> (it, its drawn one)
    for name, module in model.named_modules():
        if name in skip:
            continue
        for attr, meta in list(module._parameters.items()):
            if meta is None:
                continue
            if id(meta) in made:
                module._parameters[attr] = made[id(meta)][1]
                continue
            _draw(module, attr, f"{name}.{attr}" if name else attr, seed, device, std)
            made[id(meta)] = (meta, module._parameters[attr])
        if _is_rotary(module):
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)  # transformers' own computation of the frequencies
    return deferred
