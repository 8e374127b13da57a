"""A backdoored instruction set, LoRA fine-tuning on it, and the check that the backdoor took.

The influence benchmark needs a ground truth: a few training examples whose instruction carries a
trigger phrase and whose output is a fixed absurd answer. A model fine-tuned on the mix answers any
triggered prompt with the absurd answer, and only the poisoned examples taught it that, so a good
influence method ranks them first for such a generation (RapidIn's backdoor experiment).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from zobench.errors import UserError
from zobench.gates import peft
from zobench.influence.data import collate, encode, format_prompt, response_loss
from zobench.influence.suite import RESPONSE, TRIGGER
from zobench.models.lora import dispatchable, load_adapter  # noqa: F401  (load_adapter: callers here)


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


def finetune_lora(loaded, examples: list[dict], *, steps: int, batch_size: int, lr: float, max_length: int,
                  r: int = 8, alpha: int = 16, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                  seed: int = 0, log_every: int = 10, on_log: Callable[[int, float], None] | None = None) -> dict:
    """Fine-tune a LoRA adapter (dropout 0) on the response loss of ``examples``; AdamW on the adapter only.

    ``loaded.model`` becomes the peft model, in eval mode. Batches walk seeded shuffles of the examples,
    one epoch after another, so every example is seen equally often. Returns {losses (one per step),
    finetune_s, trainable (adapter parameter count)}.
    """
    lib = peft.load()
    if isinstance(loaded.model, lib.PeftModel):
        raise UserError(f"model '{loaded.spec}' already carries a LoRA adapter; load the base model to fine-tune")
    if not examples:
        raise UserError("finetune_lora: no training examples")
    tok = loaded.tokenizer
    encoded = [encode(tok, format_prompt(e), e["output"], max_length) for e in examples]
    # peft draws the LoRA A matrices from torch's CPU generator: seed it for this call only
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        model = lib.get_peft_model(loaded.model, dispatchable(lib.LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))))
    loaded.model = model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)   # as fo.py's LoRA baseline
    gen, order = torch.Generator().manual_seed(seed), []
    losses, start = [], time.perf_counter()
    model.train()
    try:
        for step in range(steps):
            batch = []
            while len(batch) < min(batch_size, len(encoded)):
                if not order:
                    order = torch.randperm(len(encoded), generator=gen).tolist()
                batch.append(encoded[order.pop()])
            loss = response_loss(model, *collate(batch, _pad_id(tok)))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_log is not None and (step % max(1, log_every) == 0 or step == steps - 1):
                on_log(step, losses[-1])
    finally:
        model.eval()
    return {"losses": losses, "finetune_s": time.perf_counter() - start, "trainable": sum(p.numel() for p in params)}


def save_adapter(model, path: str | Path) -> None:
    model.save_pretrained(str(path))


def _pad_id(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), the new text only, up to eos."""
    dev, pad, eos, texts = next(model.parameters()).device, _pad_id(tokenizer), tokenizer.eos_token_id, []
    with torch.inference_mode():
        for lo in range(0, len(prompts), batch_size):
            seqs = tokenizer(prompts[lo:lo + batch_size])["input_ids"]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=dev)
            attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=dev)
            out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad)
            for row in out[:, width:].tolist():
                cut = row.index(eos) if eos in row else len(row)
                texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
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
