"""The logits a score needs, and no more: projected onto the vocabulary only at the scored positions
(``slices_logits``), and from packed rows where the model allows it.

Packed rows (``pack=True``): a batch of sentences of mixed lengths padded to its longest is mostly
padding (SST-2 at batch 16: ~13 real tokens an example, padded to ~40). The forward then puts the real
tokens of several sequences into one row (first-fit decreasing, rows no wider than the padded batch, so
never more rows, activations or attention scores than padding), restarts the position ids at each
sequence, and leaves the attention mask out: transformers then reads the sequence boundaries from the
position ids and keeps the sequences apart (its packed-sequence masks). The logits at the scored
positions are the padded way's (tested to float32 tolerance); only model types whose masks and positions
work that way are packed (``PACKED_MODEL_TYPES``), others keep their padding.
"""

from __future__ import annotations

import sys

import torch


def slices_logits(model) -> bool:
    """Whether the model projects onto the vocabulary only where a boolean `logits_to_keep` says.

    transformers' `slice_logits_to_keep` takes a [batch, seq] boolean mask and returns [n_true, vocab]
    logits; without it the full [batch, seq, vocab] logits are materialized, often the largest tensor
    of a forward pass (vocab 32k-50k), which would inflate the memory this benchmark measures.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep", None) is not None


# Model types whose forward reads packed sequences from position ids (transformers' masking_utils builds
# the causal mask per sequence when no attention mask is given; rotary positions come from position_ids).
# Each is tested against its padded forward in tests/test_packing.py.
PACKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def packs(model) -> bool:
    """Whether ``model``'s forward can take packed rows (see the module's docstring)."""
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "model_type", None) in PACKED_MODEL_TYPES
            and getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager"))


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the sequences (indices into ``lengths``) of each row, no row longer than
    ``width``; ties keep the original order, so the layout is a function of the lengths alone."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, f in enumerate(fill):
            if f + lengths[i] <= width:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    return rows


def _packed_logits(model, ids: torch.Tensor, attn: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """The kept logits of a right-padded batch from packed rows, in the padded batch's order; None when
    the batch is not right-padded or keeps a padding position (then it runs padded)."""
    lengths = attn.sum(1)
    if not bool((attn.cumprod(1).sum(1) == lengths).all()) or bool((keep & (attn == 0)).any()):
        return None
    lens, width = lengths.tolist(), ids.shape[1]
    rows = pack_rows(lens, width)
    row_width = max(sum(lens[i] for i in row) for row in rows)
    src = torch.full((len(rows), row_width), -1, dtype=torch.long)  # flat index into the padded batch
    pos = torch.zeros((len(rows), row_width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            src[r, at:at + lens[i]] = i * width + torch.arange(lens[i])
            pos[r, at:at + lens[i]] = torch.arange(lens[i])
            at += lens[i]
        pos[r, at:] = torch.arange(row_width - at)  # the tail is a sequence of its own: nothing attends to it
    src, pos = src.to(ids.device), pos.to(ids.device)
    real = src >= 0
    flat = src.clamp(min=0)
    p_ids, p_keep = ids.reshape(-1)[flat], keep.reshape(-1)[flat] & real
    if slices_logits(model):
        logits = model(input_ids=p_ids, position_ids=pos, use_cache=False, logits_to_keep=p_keep).logits
        if logits.dim() != 2:
            logits = logits[p_keep]
    else:
        logits = model(input_ids=p_ids, position_ids=pos, use_cache=False).logits[p_keep]
    return logits[torch.argsort(src[p_keep])]  # packed row-major -> the padded batch's row-major order


def kept_logits(model, ids: torch.Tensor, attn: torch.Tensor, keep: torch.Tensor, pack: bool = False) -> torch.Tensor:
    """float32 [n kept, vocab] logits at the positions ``keep`` marks: projected onto the vocabulary only
    there when the model can, and upcast only those rows (never a float32 [B, T, V] copy). ``pack``: from
    packed rows where the model and batch allow it."""
    logits = _packed_logits(model, ids, attn, keep) if pack and packs(model) else None
    if logits is None and slices_logits(model):
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep).logits
        if logits.dim() != 2:
            logits = None
    if logits is None:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[keep]
    return logits.float()
