"""The model side of instruction tuning (task kind ``instruction``): token ids with response-only labels,
the loss over them, and its evaluation, as ``tasks.scoring`` is for MeZO's classification and generation.

The prompt and the response are tokenized apart and concatenated, so the boundary between them is exact
(tokenizing the joined text could merge the prompt's last characters with the response's first). The loss
is the shifted causal-LM cross-entropy over the response tokens only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from zobench.errors import UserError
from zobench.tasks.base import Example
from zobench.tasks.scoring import padding_id

IGNORE = -100   # the label of a position that adds nothing to the loss (torch's cross_entropy default)


def encode(tokenizer, prompt: str, response: str, max_length: int) -> dict:
    """{input_ids [T], labels [T], response_start}: prompt tokens, response tokens, eos; labels are IGNORE
    on the prompt.

    Truncation to ``max_length`` keeps the prompt's start and at least one response token: the
    response's tail goes first (its eos with it: the answer was cut, not finished); only when the prompt
    alone leaves no room for a response token is the prompt's tail cut too (losing "### Response:",
    which a sensible max_length avoids).
    """
    if max_length < 2:
        raise ValueError("encode needs max_length >= 2 (a prompt token and a response token)")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos token: responses could not be ended")
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    p = p[:max_length - 1]
    r = r[:max_length - len(p)]
    ids = torch.tensor(p + r, dtype=torch.long)
    labels = ids.clone()
    labels[:len(p)] = IGNORE
    return {"input_ids": ids, "labels": labels, "response_start": len(p)}


def collate(encoded: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T], labels [B, T]), right-padded; pads are IGNORE in labels."""
    width = max(e["input_ids"].numel() for e in encoded)
    ids = torch.full((len(encoded), width), int(pad_id), dtype=torch.long)
    attn = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(encoded):
        n = e["input_ids"].numel()
        ids[i, :n], attn[i, :n], labels[i, :n] = e["input_ids"], 1, e["labels"]
    return ids, attn, labels


def torch_order(seed: int) -> Callable[[int], list[int]]:
    """Permutations from a torch generator seeded with ``seed`` (``randperm``: the LoRA fine-tune's order)."""
    gen = torch.Generator().manual_seed(seed)
    return lambda n: torch.randperm(n, generator=gen).tolist()


def response_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not IGNORE, pooled over the whole batch.

    Position t's label is predicted from the logits at t-1 (the causal shift). ``token_weights`` [B, T]
    is indexed like ``labels`` and weights each labelled position (a weighted mean); zeros drop a
    token. That is how a query's loss is limited to chosen generated tokens (token-wise influence).
    """
    ce, target = token_losses(model, input_ids, attention_mask, labels)
    weight = (target != IGNORE).float()
    if token_weights is not None:
        weight = weight * token_weights[:, 1:].to(target.device, torch.float32)
    total = weight.sum()
    if not total > 0:
        raise ValueError("response_loss: no labelled token has a positive weight")
    return (ce * weight).sum() / total


def token_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy at every position [B, T-1], 0 where the label is IGNORE; the shifted labels [B, T-1]):
    position t's label predicted from the logits at t-1 (the causal shift)."""
    dev = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev)).logits[:, :-1]
    target = labels[:, 1:].to(dev)
    # float32 for the softmax: a bf16 log-sum-exp over ~50k logits loses the small per-token losses
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                         ignore_index=IGNORE, reduction="none").view_as(target)
    return ce, target


def encode_batch(examples: list[Example], tokenizer, max_length: int, vocab_size: int | None = None) -> dict:
    """A right-padded training batch of ``examples`` (prompt + target, labels on the target and its eos)."""
    ids, attn, labels = collate([encode(tokenizer, ex.prompt, ex.target, max_length) for ex in examples],
                                padding_id(tokenizer))
    if vocab_size:  # a random-weight model's vocabulary may be smaller than the tokenizer's
        ids %= vocab_size
        labels = torch.where(labels == IGNORE, labels, labels % vocab_size)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def loss(model, batch: dict) -> torch.Tensor:
    return response_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def evaluate(model, tokenizer, examples: list[Example], batch_size: int = 16, max_length: int = 256,
             vocab_size: int | None = None, details: dict | None = None) -> dict:
    """{"loss"}: the response tokens' mean cross-entropy over the split (pooled over tokens, as training's
    is). ``details`` receives ``id`` and each example's own mean ``loss``."""
    if not examples:
        return {"loss": None}
    sums, counts = [], []
    with torch.inference_mode():
        for i in range(0, len(examples), max(1, batch_size)):
            batch = encode_batch(examples[i:i + batch_size], tokenizer, max_length, vocab_size)
            ce, target = token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            sums += ce.sum(1).double().cpu().tolist()
            counts += (target != IGNORE).sum(1).cpu().tolist()
    if details is not None:
        details.update(id=np.array([-1 if ex.id is None else int(ex.id) for ex in examples], dtype=np.int64),
                       loss=np.array([s / max(1, c) for s, c in zip(sums, counts)], dtype=np.float64))
    return {"loss": sum(sums) / max(1, sum(counts))}


def count_truncated(examples: list[Example], tokenizer, max_length: int) -> int:
    """How many of ``examples`` lose response tokens (or their eos) to ``max_length`` (``encode``)."""
    if not examples:
        return 0
    prompts = tokenizer([ex.prompt for ex in examples])["input_ids"]
    responses = tokenizer([ex.target for ex in examples], add_special_tokens=False)["input_ids"]
    return sum(len(p) + len(r) + 1 > max_length for p, r in zip(prompts, responses))
