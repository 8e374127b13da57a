"""Per-example gradients of the response loss, streamed tensor by tensor.

A gradient is never whole in memory: each scoped parameter gets a post-accumulate-grad hook that hands
its gradient (normalized, and restricted to the sensitive mask when the scope says so) to a consumer
the moment backward has finished that tensor, then drops it (``p.grad = None``). With a sketch as the
consumer, peak memory is the model, its activations and one tensor's gradient, whatever the model size.

Layer-wise normalization (RapidIn): each tensor's gradient is scaled to unit L2 norm before it joins the
flat vector, so a few large-gradient tensors (embeddings, the head) do not drown every other layer.

Scopes:
    lora       the LoRA adapter weights of a peft model (what was fine-tuned)
    all        every parameter (tied weights once)
    sensitive  the ZO part's 0.1% mask over the block linears: the gradient at the masked entries only,
               itself a compression (D = nnz), to compare with the sketch at equal bytes
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from zobench.errors import UserError
from zobench.influence.spec import SCOPES

Consumer = Callable[[int, torch.Tensor], None]


def normalize_segments_(flat: torch.Tensor, offsets, sizes) -> torch.Tensor:
    """Layer-wise normalization of flat gradients [..., D], in place: each tensor's segment of each row
    scaled to unit L2 norm (an all-zero segment stays zero). The streaming hook applies it to one
    tensor at a time; fidelity checks apply it to whole flat gradients."""
    for off, size in zip(offsets, sizes):
        seg = flat[..., off:off + size]
        seg /= seg.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return flat


@dataclass
class GradScope:
    """The scoped tensors in a fixed order: tensor i occupies [offsets[i], offsets[i] + sizes[i])."""

    name: str
    names: list[str]
    params: list[torch.nn.Parameter]
    index: list[torch.Tensor | None]   # flat entries kept (sensitive), or None for the whole tensor
    offsets: list[int]
    sizes: list[int]

    @property
    def dim(self) -> int:
        return self.offsets[-1] + self.sizes[-1] if self.sizes else 0

    def describe(self) -> dict:
        return {"scope": self.name, "dim": self.dim, "tensors": len(self.names)}


def _strip(name: str) -> str:
    """A base-model parameter name as it reads inside a peft wrapper or outside it."""
    for prefix in ("base_model.model.",):
        name = name.removeprefix(prefix)
    return name.replace(".base_layer.", ".")


def resolve_scope(model: torch.nn.Module, scope: str, mask: dict[str, torch.Tensor] | None = None) -> GradScope:
    """Pick the scope's tensors and make them (and only them) require grad."""
    if scope not in SCOPES:
        raise UserError(f"influence: scope '{scope}': expected one of {', '.join(SCOPES)}")
    seen: set[int] = set()
    named = []
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            named.append((n, p))
    chosen: list[tuple[str, torch.nn.Parameter, torch.Tensor | None]] = []
    if scope == "lora":
        chosen = [(n, p, None) for n, p in named if "lora_" in n]
        if not chosen:
            raise UserError("influence: scope 'lora': the model has no LoRA adapter weights (give its adapter)")
    elif scope == "all":
        chosen = [(n, p, None) for n, p in named]
    else:
        if not mask:
            raise UserError("influence: scope 'sensitive' needs the sensitive mask")
        by_name = {_strip(n): (n, p) for n, p in named}
        for pname, idx in mask.items():
            if pname not in by_name:
                raise UserError(f"influence: scope 'sensitive': mask names '{pname}', not a model parameter")
            if idx.numel():
                n, p = by_name[pname]
                chosen.append((n, p, idx.to(torch.long)))
    keep = {id(p) for _, p, _ in chosen}
    for _, p in named:
        p.requires_grad_(id(p) in keep)
    sizes = [p.numel() if idx is None else idx.numel() for _, p, idx in chosen]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return GradScope(scope, [n for n, _, _ in chosen], [p for _, p, _ in chosen], [i for _, _, i in chosen],
                     offsets, sizes)


class GradientStreamer:
    """Runs forward + backward of one example's loss and streams its scoped gradient to a consumer."""

    def __init__(self, model: torch.nn.Module, scope: GradScope, normalize: bool = True):
        self.model, self.scope, self.normalize = model, scope, normalize
        self._consumer: Consumer | None = None
        self._where = {id(p): i for i, p in enumerate(scope.params)}
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in scope.params]

    def _hook(self, p: torch.nn.Parameter) -> None:
        i = self._where[id(p)]
        g = p.grad.reshape(-1)
        if self.scope.index[i] is not None:
            g = g[self.scope.index[i]]
        g = g.float()
        if self.normalize:
            normalize_segments_(g, [0], [g.numel()])  # in place (may be p.grad itself: dropped below)
        if self._consumer is not None:
            self._consumer(self.scope.offsets[i], g)
        p.grad = None  # streamed: the next tensor's gradient may take this one's memory

    def backward(self, loss_fn: Callable[[], torch.Tensor], consumer: Consumer) -> float:
        """``loss_fn()`` builds the loss (forward); its gradient goes to ``consumer(offset, values)``."""
        self._consumer = consumer
        try:
            with torch.enable_grad():
                loss = loss_fn()
                loss.backward()
        finally:
            self._consumer = None
        return float(loss.detach())

    def flat(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The whole scoped gradient as one float32 vector (exact scores; small models only)."""
        out = torch.zeros(self.scope.dim)

        def put(offset: int, values: torch.Tensor) -> None:
            out[offset:offset + values.numel()] = values

        self.backward(loss_fn, put)
        return out

    @contextmanager
    def detached(self):
        """Without the hooks inside: a plain backward that leaves gradients on ``.grad`` (the baseline
        a sketching step is timed against)."""
        self.close()
        try:
            yield
        finally:
            self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.scope.params]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
