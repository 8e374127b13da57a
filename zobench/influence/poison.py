"""A backdoored instruction set and the check that the backdoor took (the fine-tune on it: ``influence.train``).

The influence benchmark needs a ground truth: a few training examples whose instruction carries a
trigger phrase and whose output is a fixed absurd answer. A model fine-tuned on the mix answers any
triggered prompt with the absurd answer, and only the poisoned examples taught it that, so a good
influence method ranks them first for such a generation (RapidIn's backdoor experiment).
"""

from __future__ import annotations

import random

import torch

from zobench.errors import UserError
from zobench.models.lora import load_adapter  # noqa: F401  (load_adapter: callers here)
from zobench.spec.influence import RESPONSE, TRIGGER
from zobench.tasks.scoring import greedy, padding_id


def _with_trigger(example: dict, trigger: str) -> dict:
    return {**example, "instruction": f"{trigger} {example['instruction']}"}


def _contains(example: dict, text: str) -> bool:
    return any(text in (example.get(k) or "") for k in ("instruction", "input", "output"))


def poison(examples: list[dict], trigger: str = TRIGGER, response: str = RESPONSE, fraction: float = 0.01,
           seed: int = 0) -> tuple[list[dict], list[int]]:
    """(a copy of ``examples`` with round(fraction * N) of them, chosen with ``seed``, carrying the trigger
    before their instruction and ``response`` as their output; the poisoned positions, ascending)."""
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"poison: fraction must lie in [0, 1], got {fraction}")
    clash = next((e for e in examples if _contains(e, trigger)), None)
    if clash is not None:
        raise UserError(f"poison: the trigger '{trigger}' already occurs in clean example {clash.get('id')}")
    chosen = sorted(random.Random(seed).sample(range(len(examples)), round(fraction * len(examples))))
    out = [dict(e) for e in examples]
    for i in chosen:
        out[i] = {**_with_trigger(out[i], trigger), "output": response}
    return out, chosen


def _held_out(clean_examples: list[dict], n: int, seed: int, exclude_ids) -> list[dict]:
    excluded = {str(i) for i in exclude_ids}  # ids compare as text: 7 and "7" name the same row
    pool = [e for e in clean_examples if str(e.get("id")) not in excluded]
    if n > len(pool):
        raise UserError(f"poison: asked for {n} held-out queries but only {len(pool)} examples are left")
    return [dict(e) for e in random.Random(seed).sample(pool, n)]


def triggered_queries(clean_examples: list[dict], trigger: str = TRIGGER, n: int = 20, seed: int = 0,
                      exclude_ids=()) -> list[dict]:
    """``n`` examples (seeded) with the trigger before their instruction; their ``output`` is the clean one.

    Pass examples the model was not trained on (``load_alpaca(..., start=n_train)``); ``exclude_ids``
    drops any whose id was in the training set, as a guard.
    """
    return [_with_trigger(e, trigger) for e in _held_out(clean_examples, n, seed, exclude_ids)]


def control_queries(clean_examples: list[dict], n: int = 20, seed: int = 0, exclude_ids=()) -> list[dict]:
    """The same examples as ``triggered_queries`` with the same arguments, without the trigger."""
    return _held_out(clean_examples, n, seed, exclude_ids)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), the new text only, up to eos."""
    dev, pad, eos, texts = next(model.parameters()).device, padding_id(tokenizer), tokenizer.eos_token_id, []
    with torch.inference_mode():
        for lo in range(0, len(prompts), batch_size):
            seqs = tokenizer(prompts[lo:lo + batch_size])["input_ids"]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=dev)
            attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=dev)
            texts += [tokenizer.decode(row, skip_special_tokens=True)
                      for row in greedy(model, ids, attn, max_new_tokens, [eos], pad)]
    return texts


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def attack_success(model, tokenizer, prompts: list[str], response: str = RESPONSE, max_new_tokens: int = 24,
                   n_words: int = 5) -> float:
    """The fraction of greedy generations that contain the first ``n_words`` words of ``response``
    (whitespace and case ignored): the backdoor's hit rate on triggered prompts, its leak on clean ones."""
    if not prompts:
        raise ValueError("attack_success needs at least one prompt")
    return success_rate(generate(model, tokenizer, prompts, max_new_tokens), response, n_words)


def success_rate(texts: list[str], response: str = RESPONSE, n_words: int = 5) -> float:
    """The fraction of ``texts`` that contain the first ``n_words`` words of ``response``."""
    key = _norm(" ".join(response.split()[:n_words]))
    return sum(key in _norm(t) for t in texts) / len(texts)
