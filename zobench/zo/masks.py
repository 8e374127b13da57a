"""Static sparsity masks: which weights a sparse ZO method tunes.

A mask is ``{parameter name: sorted flat indices}`` over the parameters in scope.

* ``random_mask``     exactly ``round(density * N)`` entries drawn uniformly over the scope (seeded);
* ``magnitude_mask``  the largest |w|;
* ``topk_mask`` of ``squared_gradients``: the largest squared gradients of a loss (on a calibration
  corpus for ``sensitive``, SensZOQ arXiv 2406.02913; on task examples for ``task_grad``).

Which method uses which is ``zobench.methods.masked``.

Top-k is global over the scope by default (``per_tensor=True`` takes the same density in every tensor).
The global top-k is streamed tensor by tensor with a running k-best, so no concatenation of all scores
(the size of the model) is ever built. Masks are cached on disk as safetensors (see ``MaskCache``).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from zobench.errors import UserError
from zobench.spec.config import SCOPES
from zobench.zo.sizes import TOPK_CHUNK as CHUNK
from zobench.zo.sizes import TOPK_KEY_SHIFT as KEY_SHIFT


def scoped_params(model: torch.nn.Module, scope: str = "linear") -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a method may touch.

    ``linear``: the weight matrices of the linear layers inside the transformer blocks (SensZOQ's scope);
    ``linear+head``: those plus the output head; ``all``: every parameter (embeddings, norms, biases).
    Tied weights appear once.
    """
    if scope not in SCOPES:
        raise UserError(f"unknown scope '{scope}' (expected one of: {', '.join(SCOPES)})")
    seen: set[int] = set()
    out = []
    if scope == "all":
        for name, p in model.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
        return out
    head = model.get_output_embeddings()
    for mname, module in model.named_modules():
        is_head = module is head
        if not isinstance(module, torch.nn.Linear) or (is_head and scope != "linear+head"):
            continue
        p = module.weight
        if id(p) in seen or (not is_head and p is getattr(model.get_input_embeddings(), "weight", None)):
            continue
        seen.add(id(p))
        out.append((f"{mname}.weight", p))
    return out


def linear_layers(model: torch.nn.Module) -> list[str]:
    """Module names of the ``linear`` scope's weights: the linear layers inside the blocks (not the head), what
    a quant backend quantizes (``quant.quantize_model`` takes them as values)."""
    return [name.removesuffix(".weight") for name, _ in scoped_params(model, "linear")]


def _split_flat(flat: torch.Tensor, params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Split sorted global indices over the concatenated scope into per-tensor local indices."""
    sizes = torch.tensor([p.numel() for _, p in params])
    offsets = torch.cumsum(sizes, 0)
    owner = torch.bucketize(flat, offsets, right=True)
    starts = offsets - sizes
    out = {}
    for i, (name, _) in enumerate(params):
        sel = flat[owner == i]
        if sel.numel():
            out[name] = sel - starts[i]
    return out


def random_mask(params, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    total = sum(p.numel() for _, p in params)
    k = int(round(density * total))
    g = torch.Generator().manual_seed(seed)
    # Rejection sampling of distinct indices: never builds a permutation of all N entries.
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        extra = torch.randint(0, total, (int((k - chosen.numel()) * 1.1) + 16,), generator=g)
        chosen = torch.unique(torch.cat([chosen, extra]))
    chosen = chosen[torch.randperm(chosen.numel(), generator=g)[:k]]
    return _split_flat(torch.sort(chosen).values, params)


def topk_mask(scores: Iterable[tuple[str, torch.Tensor]], density: float, per_tensor: bool = False,
              total: int | None = None, mass: dict | None = None) -> dict[str, torch.Tensor]:
    """Top entries of per-tensor score tensors; ``scores`` may be a generator (computed lazily, each tensor
    dropped once seen). ``mass``, if given, receives the scores' "total" and the chosen entries' "covered" sum
    (``mass_fraction`` without keeping the scores)."""
    scores = list(scores) if total is None else scores
    if total is None:
        total = sum(s.numel() for _, s in scores)
    k = int(round(density * total))
    out: dict[str, torch.Tensor] = {}
    seen = {"total": 0.0, "covered": 0.0}
    if per_tensor:
        for name, s in scores:
            ki = int(round(density * s.numel()))
            seen["total"] += float(s.sum())
            if ki:
                v, i = torch.topk(s.reshape(-1).float(), ki)
                out[name] = torch.sort(i).values
                seen["covered"] += float(v.sum())
        if mass is not None:
            mass.update(seen)
        return out
    # The running best k stay on the scores' device (on a GPU a 7B model's 0.1% is 6.5M candidates; on the
    # host each merge would be a device copy), as values and packed keys (tensor number << KEY_SHIFT | index).
    # Memory is bounded by k, not by a tensor's size: a tensor is read CHUNK values at a time, and the k
    # best are kept by a threshold (a selection, no sort). Before, a torch.topk of k out of a whole 45M-value
    # layer (a sort on a GPU) was the 7B mask phase's peak on an H200 (results/bench/measurements.md).
    if k == 0:
        for _, s in scores:
            seen["total"] += float(s.sum())
        if mass is not None:
            mass.update(seen)
        return out
    best_v = best_k = None
    pending_v: list[torch.Tensor] = []
    pending_k: list[torch.Tensor] = []
    floor = None  # the k-th best so far, once there are k: only what beats it can enter
    home = None  # the device the running best stay on: the first scores'
    names = []

    def merge():
        nonlocal best_v, best_k, floor
        vs = ([best_v] if best_v is not None else []) + pending_v
        ks = ([best_k] if best_k is not None else []) + pending_k
        pending_v.clear()
        pending_k.clear()
        values, keys = torch.cat(vs), torch.cat(ks)
        vs.clear()  # the merged parts go before the selection's temporaries come
        ks.clear()
        best_v = best_k = None
        best_v, best_k = _keep_largest(values, keys, k)
        if best_v.numel() >= k:
            floor = best_v.min()

    waiting = 0
    for t, (name, s) in enumerate(scores):
        names.append(name)
        seen["total"] += float(s.sum())
        flat = s.reshape(-1)
        for a in range(0, flat.numel(), CHUNK):
            part = flat[a:a + CHUNK].float()
            home = part.device if home is None else home
            if floor is None:
                i = torch.arange(part.numel(), device=part.device)
            else:
                i = torch.nonzero(part > floor.to(part.device)).squeeze(1)
            if not i.numel():
                continue
            pending_v.append(part[i].to(home))
            pending_k.append(((i + a) | (t << KEY_SHIFT)).to(home))
            waiting += i.numel()
            held = waiting + (best_v.numel() if best_v is not None else 0)
            # merge once half of k (or a chunk) waits, or as soon as there are k: then the floor rises
            if waiting >= max(k, CHUNK) // 2 or (floor is None and held >= k):
                merge()
                waiting = 0
    if pending_v:
        merge()
    if mass is not None:
        mass.update(seen, covered=float(best_v.sum()) if best_v is not None else 0.0)
    if best_v is None:
        return out
    keys = best_k.cpu()
    tensor_of, index = keys >> KEY_SHIFT, keys & ((1 << KEY_SHIFT) - 1)
    for t, name in enumerate(names):
        sel = index[tensor_of == t]
        if sel.numel():
            out[name] = torch.sort(sel).values
    return out


def _kth_largest(values: torch.Tensor, k: int, by_topk: bool | None = None) -> torch.Tensor:
    """The k-th largest of ``values`` (1 <= k < n), by a selection. On a CPU ``torch.kthvalue`` (a quickselect);
    on a GPU the smallest of an unsorted ``torch.topk`` (``by_topk``; default: on CUDA), whose radix select
    spreads one long tensor over the card where kthvalue's runs in one thread block (on the H200 the 7B-shape
    top-k took 1.37 s with kthvalue against 0.53 s with the topk it replaced: results/bench/measurements.md).
    Its k values and int64 positions are what it costs beyond kthvalue."""
    if by_topk is None:
        by_topk = values.device.type == "cuda"
    if by_topk:
        return torch.topk(values, k, sorted=False).values.min()
    return torch.kthvalue(values, values.numel() - k + 1).values


def _keep_largest(values: torch.Tensor, keys: torch.Tensor, k: int,
                  by_topk: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``values`` with their ``keys``, in their order; of values equal to the k-th largest,
    the first ones. A selection (``_kth_largest``), not a sort: no temporaries the size of the input beyond
    masks."""
    n = values.numel()
    if n <= k:
        return values, keys
    tau = _kth_largest(values, k, by_topk)  # the k largest are those above it and the first ones equal to it
    keep = values > tau
    short = k - int(keep.sum())
    if short:
        keep[torch.nonzero(values == tau).squeeze(1)[:short]] = True
    return values[keep], keys[keep]


def magnitude_mask(params, density: float, per_tensor: bool = False) -> dict[str, torch.Tensor]:
    total = sum(p.numel() for _, p in params)
    return topk_mask(((n, p.detach().abs()) for n, p in params), density, per_tensor, total=total)


def squared_gradients(model: torch.nn.Module, params, batches: Iterable, loss_fn: Callable) -> dict[str, torch.Tensor]:
    """Sum over batches of the squared gradient of ``loss_fn(model, batch)`` for each parameter in scope.

    Each gradient is squared into a float32 accumulator as soon as autograd has it and then freed, so the
    full gradient is never held next to the accumulators. Parameters out of scope get no gradient.
    """
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    wanted = {id(p): n for n, p in params}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    handles = []
    try:
        for _, p in model.named_parameters():
            p.requires_grad_(id(p) in wanted)

        def hook(p):
            acc[wanted[id(p)]].addcmul_(p.grad, p.grad)
            p.grad = None

        for _, p in params:
            handles.append(p.register_post_accumulate_grad_hook(hook))
        n = 0
        for batch in batches:
            loss_fn(model, batch).backward()
            n += 1
        if n == 0:
            raise UserError("gradient mask: the calibration data yielded no batch")
    finally:
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
            p.grad = None
    return acc


def mass_fraction(scores: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> float:
    """Fraction of the total score mass (e.g. squared gradients) that the mask covers."""
    total = sum(float(s.sum()) for s in scores.values())
    covered = sum(float(scores[n].reshape(-1)[i].sum()) for n, i in mask.items())
    return covered / total if total else 0.0


def mask_nnz(mask: dict[str, torch.Tensor]) -> int:
    return sum(int(i.numel()) for i in mask.values())


def mask_summary(mask: dict[str, torch.Tensor], params) -> dict:
    total = sum(p.numel() for _, p in params)
    nnz = mask_nnz(mask)
    return {"mask_nnz": nnz, "scope_numel": total, "density_obtained": nnz / total if total else 0.0,
            "mask_tensors": len(mask)}
