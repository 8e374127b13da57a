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
from typing import Iterator

import torch
from torch import nn

from zobench.errors import UserError
from zobench.fingerprint import fingerprint_of_heads, head
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


def foreign_buffers(module: nn.Module) -> bool:
    """Whether ``module`` holds buffers zobench cannot compute (any but a rotary embedding's frequencies)."""
    has_buffers = any(b is not None for b in module._buffers.values())
    return has_buffers and bool(module._parameters or not _is_rotary(module))


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
        if foreign_buffers(module):
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


class Deferred:
    """Block linears left on the meta device at load, made when asked for: ``arrive`` makes them one at a time
    for good; ``draw`` and ``release`` make one for a while and put it back on the meta device (a mask computed
    block by block: ``models.layerwise``); ``head`` reads only a tensor's first values (its fingerprint).
    Where the values come from is the subclass's: seeded draws (``Drawn``) or a checkpoint's shards
    (``models.shards.FromShards``)."""

    def __init__(self, names: list[str], device):
        self.names = list(names)            # not yet arrived
        self.drawable = tuple(names)        # every deferred linear
        self.device = torch.device(device)

    def make(self, module: nn.Module, attr: str, pname: str) -> None:
        """Give ``module``'s parameter ``attr`` (full name ``pname``) its values on ``self.device``, in place."""
        raise NotImplementedError

    def head(self, model: nn.Module, pname: str, n: int = 1024) -> torch.Tensor:
        """The first ``n`` values parameter ``pname`` gets when made, without making the rest."""
        raise NotImplementedError

    def draw(self, model: nn.Module, name: str) -> None:
        """Make the deferred linear ``name``'s parameters, in place."""
        linear = model.get_submodule(name)
        for attr in list(linear._parameters):
            if linear._parameters[attr] is not None:
                self.make(linear, attr, f"{name}.{attr}")

    @staticmethod
    def release(model: nn.Module, name: str) -> None:
        """Put linear ``name``'s parameters back on the meta device (their memory goes)."""
        linear = model.get_submodule(name)
        for attr, p in list(linear._parameters.items()):
            if p is not None:
                linear._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                        requires_grad=p.requires_grad)

    def fingerprint(self, model: nn.Module, params) -> str:
        """``fingerprint.weights_fingerprint`` of ``params`` ((name, tensor) pairs of ``model``) as if every
        deferred one were made: equal to the whole float model's."""
        return fingerprint_of_heads((n, tuple(p.shape), p.dtype, self.head(model, n) if p.is_meta else head(p))
                                    for n, p in params)

    def fill(self, model: nn.Module) -> None:
        """Make every parameter of the meta-device ``model`` but the deferred linears', and compute the rotary
        embeddings' buffers as transformers does. Tied parameters (a head sharing the embedding's weight)
        stay tied: made once, under their first name."""
        skip = set(self.drawable)
        made: dict[int, nn.Parameter] = {}  # id of a meta parameter -> the one made for it
        for name, module in model.named_modules():
            if name in skip:
                continue
            for attr, meta in list(module._parameters.items()):
                if meta is None:
                    continue
                if id(meta) not in made:
                    self.make(module, attr, f"{name}.{attr}" if name else attr)
                    made[id(meta)] = module._parameters[attr]
                module._parameters[attr] = made[id(meta)]
            if _is_rotary(module):
                module.to_empty(device=self.device, recurse=False)
                model._init_weights(module)  # transformers' own computation of the frequencies

    def arrive_all(self, model: nn.Module) -> None:
        """Make every deferred linear not yet made: the model is then whole."""
        for _ in self.arrive(model):
            pass

    def arrive(self, model: nn.Module) -> Iterator[str]:
        """Make each deferred linear in place and yield its module name; the caller replaces (quantizes) the
        layer before asking for the next, so at most one of them is float at a time."""
        while self.names:
            name = self.names.pop(0)
            self.draw(model, name)
            yield name


class Drawn(Deferred):
    """Deferred linears of a random model: each drawn from its own seeded stream (``_draw``)."""

    def __init__(self, names: list[str], device, seed: int, std: float):
        super().__init__(names, device)
        self.seed, self.std = int(seed), std

    def make(self, module, attr, pname) -> None:
        _draw(module, attr, pname, self.seed, self.device, self.std)

    def head(self, model, pname, n=1024) -> torch.Tensor:
        # The counter-based draw of an element depends only on its index: the first n drawn alone.
        mname, _, attr = pname.rpartition(".")
        module = model.get_submodule(mname)
        meta = module._parameters[attr]
        t = torch.zeros(min(n, meta.numel()), dtype=meta.dtype, device=self.device)
        kind = _kind(module, attr)
        if kind == "normal":
            fused.zpass(t, 0, "gaussian", [(tensor_seed(self.seed, pname), self.std)])
        else:
            t.fill_(1.0 if kind == "one" else 0.0)
        return t


def empty_model(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The architecture of ``config`` on the meta device: shapes and dtypes, no values, no memory."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def draw_model(model: nn.Module, seed: int, device, defer: list[str] = (), what: str = "random model") -> Drawn:
    """Make every tensor of the meta-device ``model`` on ``device`` with its seeded values, but the parameters
    of the linears named in ``defer`` (returned as a ``Deferred`` for ``arrive``). Tied parameters (a head
    sharing the embedding's weight) stay tied."""
    check_drawable(model, what)
    device, std = torch.device(device), _std(model.config)
    deferred = Drawn(list(defer), device, seed, std)
    deferred.fill(model)
    return deferred
