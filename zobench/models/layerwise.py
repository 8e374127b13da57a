"""Squared gradients of a model whose block linears are never all float at once (``models.stream``).

SensZOQ's mask sums, over calibration batches, each block weight's squared gradient of the LM loss. On the
whole model that holds the float weights, a float32 accumulator the size of the scope and autograd's
activations at once: 27 GB for the accumulators alone on a 7B model. Here the decoder blocks run one at a
time, twice:

  forward   every calibration batch through block l before block l + 1 is drawn; each block's input is
            kept (blocks x batches x tokens x hidden: 256 MB for a 7B at 4 x 128 tokens in float32), in host
            memory when the model runs on a GPU (8.9 GB at 64 x 512 tokens in float16: the device holds one
            batch's at a time);
  loss      the final norm, the head and the model's own loss function on the last hidden state, whose
            gradient starts the backward;
  backward  from the last block: the block drawn again with its linears trainable, its forward recomputed
            from its kept input with autograd on and the output's gradient pushed through it, batch by
            batch; each weight's squared gradients summed over the batches in a float32 accumulator,
            handed on, and the block's weights freed.

One block's float weights, their gradients and their accumulators exist at a time. On a GPU the allocator's
cache goes back to the driver before each stage and each block's backward (``RETURN_CACHE``): the blocks of a
stage share shapes, but the running top-k between blocks (``zo.masks.topk_mask``) leaves cached blocks of
other sizes that the next block cannot reuse, and the card would hold them (bench/mask_memory.py). The
gradients are the whole model's (the same operations on the same values; each block's backward recomputed from
its input, as activation checkpointing does), so the mask is the one the whole-model pass (``zo.masks``)
picks: tests/test_layerwise.py holds the scores against it. Architectures: decoder-only models whose decoder
has ``layers`` and ``norm`` and whose head is ``lm_head`` (``supports``); others are drawn whole first.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from zobench.errors import UserError
from zobench.models.stream import Deferred

RETURN_CACHE = True  # on a GPU, hand the allocator's cache back between stages and blocks (module docstring)


def _return_cache(device: torch.device) -> None:
    if RETURN_CACHE and device.type == "cuda":
        torch.cuda.empty_cache()


class _Captured(Exception):
    """Raised by the first block's pre-hook once it has seen its inputs: the rest of that forward is not run."""


def supports(model: torch.nn.Module) -> bool:
    """Whether ``squared_gradients`` can run ``model`` block by block."""
    decoder = getattr(model, "model", None)
    return (isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList) and len(decoder.layers) > 0
            and isinstance(getattr(decoder, "norm", None), torch.nn.Module)
            and isinstance(getattr(model, "lm_head", None), torch.nn.Module)
            and model.get_output_embeddings() is model.lm_head)


def _first_block_inputs(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """What the decoder hands its first block for ``input_ids``: the hidden states and the keyword arguments
    (position embeddings, attention mask, positions), computed by the model's own forward."""
    seen = {}

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.update(hidden=hidden, kwargs={k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise UserError("layer-by-layer gradients: the model's forward never reached its first block")
    return seen["hidden"], seen["kwargs"]


def _block(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def squared_gradients(model: torch.nn.Module, deferred: Deferred, batches: Iterable[torch.Tensor],
                      wanted: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(parameter name, summed squared gradient)`` for every parameter named in ``wanted`` (block
    linear weights, all among ``deferred``'s), block by block from the last; each accumulator is the caller's
    to keep or drop before the next block is drawn. ``batches``: ``[1, T]`` token id tensors, as
    ``zo.masks.squared_gradients`` takes them through ``lm_loss``."""
    batches = list(batches)
    decoder, layers = model.model, model.model.layers
    prefix = {id(layer): f"model.layers.{i}." for i, layer in enumerate(layers)}
    names = {n: n.removesuffix(".weight") for n in wanted}
    per_block: list[list[str]] = [[] for _ in layers]
    for pname, mname in names.items():
        i = next((i for i, layer in enumerate(layers) if mname.startswith(prefix[id(layer)])), None)
        if i is None or mname not in deferred.drawable:
            raise UserError(f"layer-by-layer gradients: {pname} is not a deferred block linear")
        per_block[i].append(pname)
    block_linears = [[n for n in deferred.drawable if n.startswith(prefix[id(layer)])] for layer in layers]

    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            firsts = [_first_block_inputs(model, ids) for ids in batches]
            if not firsts:
                raise UserError("gradient mask: the calibration data yielded no batch")
            device = firsts[0][0].device
            keep = torch.device("cpu")  # where the kept block inputs and their gradients wait

            def there(t):
                return t.to(device, non_blocking=True)

            kwargs = [kw for _, kw in firsts]
            inputs = [[h.to(keep) for h, _ in firsts]]  # inputs[l][b]: block l's input for batch b
            del firsts
            for i, layer in enumerate(layers):
                for name in block_linears[i]:
                    deferred.draw(model, name)
                inputs.append([_block(layer, there(h), kw).to(keep) for h, kw in zip(inputs[-1], kwargs)])
                for name in block_linears[i]:
                    deferred.release(model, name)
        _return_cache(device)
        grads = []
        for b, (ids, last) in enumerate(zip(batches, inputs.pop())):
            hidden = there(last).detach().requires_grad_(True)
            logits = model.lm_head(decoder.norm(hidden))
            ids = ids.to(logits.device)
            model.loss_function(logits=logits, labels=ids, vocab_size=model.config.vocab_size).backward()
            grads.append(hidden.grad.to(keep))
            del logits
        for i in reversed(range(len(layers))):
            _return_cache(device)
            layer = layers[i]
            for name in block_linears[i]:
                deferred.draw(model, name)
            params = {n: model.get_submodule(names[n]).weight for n in per_block[i]}
            acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
            for p in params.values():
                p.requires_grad_(True)
            for b, hidden_in in enumerate(inputs.pop()):
                x = there(hidden_in).detach().requires_grad_(True)
                torch.autograd.backward(_block(layer, x, kwargs[b]), there(grads[b]))
                for n, p in params.items():
                    acc[n].addcmul_(p.grad, p.grad)
                    p.grad = None
                grads[b] = x.grad.to(keep)
            del params
            for name in block_linears[i]:
                deferred.release(model, name)
            for n in per_block[i]:
                yield n, acc.pop(n)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen.get(name, False))
            p.grad = None
