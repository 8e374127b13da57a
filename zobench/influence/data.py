"""Alpaca instruction examples -> token ids with response-only labels, and the loss over them.

An example is a dict {id, instruction, input, output}. It is formatted with the Stanford Alpaca
templates; the prompt and the response are tokenized apart and concatenated, so the boundary between
them is exact (tokenizing the joined text could merge the prompt's last characters with the
response's first). The loss is the shifted causal-LM cross-entropy over the response tokens only: the
model is fine-tuned, and influence is measured, on what it answers, not on the instruction it was given.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from zobench.errors import UserError
from zobench.files import MAX_DATA_BYTES, check_text, parse_json, read_text

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE = -100   # the label of a position that adds nothing to the loss (torch's cross_entropy default)


def format_prompt(example: dict) -> str:
    """The Alpaca prompt; the input block only when the example has a non-blank ``input``."""
    if (example.get("input") or "").strip():
        return PROMPT_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


def _json_lines(path: Path, text: str) -> list:
    data = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                entry = parse_json(line, f"{path}: line {n}")
            except UserError as e:
                why = str(e).split(": ", 2)[-1]
                raise UserError(f"{path}: line {n} is not a JSON object ({why})") from None
            if not isinstance(entry, dict):
                raise UserError(f"{path}: line {n} is not a JSON object")
            data.append(entry)
    if not data:
        raise UserError(f"{path}: no examples (expected JSON Lines of {{instruction, input, output}} objects)")
    return data


def _read_checked(path: Path) -> list:
    """The file's entries: a JSON list of objects, or JSON Lines (one object per line, ``.jsonl``)."""
    text = read_text(path, "instruction data file", MAX_DATA_BYTES)
    if path.suffix == ".jsonl":
        data = _json_lines(path, text)
    else:
        try:
            data = parse_json(text, str(path))
        except UserError as e:
            try:  # JSON Lines under another name
                data = _json_lines(path, text)
            except UserError:
                raise UserError(f"{e}; expected a JSON list or JSON Lines of {{instruction, input, output}} "
                                f"objects") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{instruction, input, output}} objects, "
                        f"got {type(data).__name__}")
    seen: dict = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: entry {i} is not an object")
        for key in ("instruction", "output"):
            if not isinstance(entry.get(key), str):
                raise UserError(f"{path}: entry {i} lacks '{key}' (a string)")
        if not isinstance(entry.get("input", ""), str):
            raise UserError(f"{path}: entry {i}: 'input' is not a string")
        for key in ("instruction", "input", "output"):
            check_text(entry.get(key, ""), f"{path}: entry {i}: '{key}'")
        rid = entry.get("id", i)
        if not isinstance(rid, (int, str)) or isinstance(rid, bool):
            raise UserError(f"{path}: entry {i}: 'id' is not a string or an integer")
        # 7 and "7" print alike and name the same row wherever an id is shown or looked up (a query's
        # table, the poisoned ids of a suite): one file may not use both
        if str(rid) in seen:
            raise UserError(f"{path}: entries {seen[str(rid)]} and {i} share the id {rid!r} (ids name rows "
                            f"everywhere; 7 and \"7\" count as one)")
        seen[str(rid)] = i
    return data


def load_alpaca(path: str | Path, n: int | None = None, seed: int = 0, start: int = 0) -> list[dict]:
    """``n`` examples (all when None) from position ``start`` of the file's entries shuffled with ``seed``.

    The same seed gives the same order, so ``start`` carves disjoint slices of one file: a training set
    at start=0 and held-out queries at start=n_train never share an example. Each example is named by
    its ``id``: the entry's own ``id`` field when it has one, else its position in the file (from 0), so a
    row is called the same whatever order it was sampled or cached in.
    """
    path = Path(path)
    data = _read_checked(path)
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    stop = len(order) if n is None else start + n
    if start < 0 or stop > len(order):
        raise UserError(f"{path}: asked for examples {start}..{stop - 1} but the file has {len(order)} entries")
    return [{"id": data[i].get("id", i), "instruction": data[i]["instruction"], "input": data[i].get("input", ""),
             "output": data[i]["output"]} for i in order[start:stop]]


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


def epoch_batches(items: list, batch_size: int, shuffled: Callable[[int], list[int]]) -> Iterator[list]:
    """Batches of ``min(batch_size, len(items))`` items taken from the end of one shuffled order after
    another (``shuffled(n)``: a permutation of range(n)); a batch may end one epoch and begin the next, so
    every item is seen equally often."""
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < min(batch_size, len(items)):
            if not order:
                order = shuffled(len(items))
            batch.append(items[order.pop()])
        yield batch


def random_order(seed: int) -> Callable[[int], list[int]]:
    """Permutations from ``random.Random(seed)`` (a list shuffled in place: the ZO fine-tune's order)."""
    rng = random.Random(seed)

    def shuffled(n: int) -> list[int]:
        order = list(range(n))
        rng.shuffle(order)
        return order
    return shuffled


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
    dev = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev)).logits[:, :-1]
    target = labels[:, 1:].to(dev)
    # float32 for the softmax: a bf16 log-sum-exp over ~50k logits loses the small per-token losses
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                         ignore_index=IGNORE, reduction="none").view_as(target)
    weight = (target != IGNORE).float()
    if token_weights is not None:
        weight = weight * token_weights[:, 1:].to(dev, torch.float32)
    total = weight.sum()
    if not total > 0:
        raise ValueError("response_loss: no labelled token has a positive weight")
    return (ce * weight).sum() / total


def token_positions(tokenizer, input_ids: torch.Tensor, response_start: int, words: list[str]) -> list[int]:
    """Positions (indices into ``input_ids``) of the response tokens that overlap an occurrence of any of
    ``words`` (case-sensitive substring match) in the decoded response.

    Token t's character span is the growth of the decoded prefix from t-1 to t. Decoding prefixes, not
    tokens one by one, keeps the spans right for byte-level tokens that split a character, and needs no
    offsets (the response may have been truncated or generated, so there is no source string to map).
    Special tokens (eos) decode to nothing and never match.
    """
    ids = [int(t) for t in input_ids[response_start:]]
    ends = [len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = []
    for word in words:
        at = text.find(word) if word else -1
        while at >= 0:
            hits.append((at, at + len(word)))
            at = text.find(word, at + 1)
    out = []
    for k, end in enumerate(ends):
        begin = ends[k - 1] if k else 0
        if end > begin and any(begin < stop and end > start for start, stop in hits):
            out.append(response_start + k)
    return out
