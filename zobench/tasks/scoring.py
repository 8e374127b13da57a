"""The model side of a task, task-agnostic: examples -> padded batch -> loss, and evaluation.

Follows MeZO's run.py / utils.py: an option's tokens are the tail of the tokenized prompt+option beyond
the tokenized prompt; sequences are truncated from the left; a classification example is scored by the
mean log-probability of each option's tokens (length-normalized), and trained with cross-entropy over
those scores ("train as classification"); generation is greedy and stops at a newline.

Shared prompts (``shared=True``): MeZO runs one sequence per option, so a two-option task pays for its
prompt twice. When every option of every example in a batch is one token that extends the prompt's own
tokens, all of an example's options are scored from one forward of the prompt: the logits at its last
position give each option's log-probability, which is the option's whole (mean) score. The loss is the
same as the per-option way (tested to float32 tolerance); a batch where that does not hold (multi-token
options: COPA, WSC) is encoded per option as before.

Packed rows (``pack=True``) and logits only at the scored positions: ``zobench.tasks.logits``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from zobench.errors import UserError
from zobench.tasks.base import Example
from zobench.tasks.generation import exact_match, f1_score
from zobench.tasks.logits import kept_logits

KINDS = ("classification", "generation")


def _keeps_first(tokenizer) -> bool:
    # MeZO keeps the BOS token when it truncates from the left (tokenizer.add_bos_token); we ask the
    # tokenizer what it does by default rather than trust the flag (SmolLM2's adds none).
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def padding_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its eos, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _truncate(ids: list[int], max_length: int, keep_first: bool) -> list[int]:
    if len(ids) <= max_length:
        return ids
    if keep_first:
        return ids[:1] + ids[len(ids) - (max_length - 1):]
    return ids[len(ids) - max_length:]


def _join(tokenizer, prompts: list[str], conts: list[str], owner: list[int], max_length: int, keep_first: bool):
    """Token ids of prompt+continuation and how many trailing tokens are the continuation.

    Tokenizing the whole string (not prompt and option apart) keeps merges across the boundary as the
    model would see them in text; the option is the tail beyond the prompt's own token count (MeZO).
    """
    p_len = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    seqs, opt = [], []
    for ids, e in zip(tokenizer([prompts[e] + c for e, c in zip(owner, conts)])["input_ids"], owner):
        n = max(1, len(ids) - p_len[e])
        ids = _truncate(ids, max_length, keep_first)
        seqs.append(ids)
        opt.append(min(n, len(ids) - 1))   # the first token has no prediction to score
    return seqs, opt


def _pad(seqs: list[list[int]], opt: list[int] | None, pad_id: int, left: bool, vocab_size: int | None) -> dict:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        start = width - len(s) if left else 0
        ids[i, start:start + len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, start:start + len(s)] = 1
        if opt is not None and opt[i] > 0:
            mask[i, start + len(s) - opt[i]:start + len(s)] = True
    if vocab_size:
        # random-weight architectures borrow this tokenizer; fold its ids into their vocabulary
        ids %= vocab_size
    batch = {"input_ids": ids, "attention_mask": attn}
    if opt is not None:
        batch["option_mask"] = mask
    return batch


def _shared(examples: list[Example], tokenizer, max_length: int, keep_first: bool, pad_id: int,
            vocab_size: int | None) -> dict | None:
    """One sequence per example (its prompt) and each option's token, or None when an option is not a
    single token extending the prompt's own tokens."""
    p_ids = tokenizer([ex.prompt for ex in examples])["input_ids"]
    full = iter(tokenizer([ex.prompt + c for ex in examples for c in ex.candidates])["input_ids"])
    prefixes, options = [], []
    for prompt, ex in zip(p_ids, examples):
        tails = []
        for _ in ex.candidates:
            ids = next(full)
            if len(ids) != len(prompt) + 1 or ids[:-1] != prompt:
                return None
            tails.append(ids[-1])
        # What the per-option sequence conditions its option token on, cut from the left as it would be.
        prefixes.append(_truncate(prompt + tails[:1], max_length, keep_first)[:-1])
        options.append(tails)
    batch = _pad(prefixes, None, pad_id, False, vocab_size)
    width = max(len(o) for o in options)
    batch["option_ids"] = torch.tensor([o + [o[0]] * (width - len(o)) for o in options], dtype=torch.long)
    if vocab_size:
        batch["option_ids"] %= vocab_size
    batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    batch["n_options"] = torch.tensor([len(ex.candidates) for ex in examples], dtype=torch.long)
    return batch


def encode(examples: list[Example], tokenizer, kind: str, max_length: int = 256, train: bool = True,
           vocab_size: int | None = None, shared: bool = False, pack: bool = False) -> dict:
    batch = _encode(examples, tokenizer, kind, max_length, train, vocab_size, shared)
    if pack and not (kind == "generation" and not train):  # generation prompts are left-padded for generate
        batch["pack"] = True
    return batch


def _encode(examples: list[Example], tokenizer, kind: str, max_length: int = 256, train: bool = True,
            vocab_size: int | None = None, shared: bool = False) -> dict:
    """A right-padded batch (left-padded prompts for generation with train=False).

    Classification: one sequence per (example, candidate), example-major; `option_mask` marks option
    tokens, `labels` the correct index per example, `n_options` the candidates per example. A task that
    MeZO trains as an LM (COPA) gives, with train=True, only the correct option's sequence, like
    generation: prompt + target with `option_mask` on the target.
    """
    if kind not in KINDS:
        raise UserError(f"unknown task kind '{kind}' (expected {' or '.join(KINDS)})")
    if not examples:
        raise ValueError("encode needs at least one example")
    keep_first, pad_id = _keeps_first(tokenizer), padding_id(tokenizer)
    prompts = [ex.prompt for ex in examples]
    if kind == "generation" and not train:
        seqs = [_truncate(ids, max_length, keep_first) for ids in tokenizer(prompts)["input_ids"]]
        return _pad(seqs, None, pad_id, True, vocab_size)
    if kind == "generation" or (train and not all(ex.train_as_classification for ex in examples)):
        conts = [ex.target if kind == "generation" else ex.candidates[ex.label] for ex in examples]
        seqs, opt = _join(tokenizer, prompts, conts, list(range(len(examples))), max_length, keep_first)
        return _pad(seqs, opt, pad_id, False, vocab_size)
    if shared and (batch := _shared(examples, tokenizer, max_length, keep_first, pad_id, vocab_size)):
        return batch
    owner = [e for e, ex in enumerate(examples) for _ in ex.candidates]
    conts = [c for ex in examples for c in ex.candidates]
    seqs, opt = _join(tokenizer, prompts, conts, owner, max_length, keep_first)
    batch = _pad(seqs, opt, pad_id, False, vocab_size)
    batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    batch["n_options"] = torch.tensor([len(ex.candidates) for ex in examples], dtype=torch.long)
    return batch


def count_truncated(examples: list[Example], tokenizer, kind: str, max_length: int, train: bool) -> int:
    """How many of ``examples`` would lose tokens to ``max_length`` (cut from the left, as ``encode`` does).

    An example counts once, when its longest sequence (prompt + the longest candidate; prompt + target
    for generation training; the prompt alone for generation at evaluation) is longer than max_length.
    """
    texts, owner = [], []
    for i, ex in enumerate(examples):
        if kind == "generation":
            conts = [ex.target] if train else [""]
        elif train and not ex.train_as_classification:
            conts = [ex.candidates[ex.label]]
        else:
            conts = ex.candidates or [""]
        texts += [ex.prompt + c for c in conts]
        owner += [i] * len(conts)
    cut = set()
    for i, ids in zip(owner, tokenizer(texts)["input_ids"] if texts else []):
        if len(ids) > max_length:
            cut.add(i)
    return len(cut)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def token_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (float32) of the tokens under `option_mask`, and the sequence of each."""
    dev = _device(model)
    ids, attn = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    scored = batch["option_mask"].to(dev)[:, 1:]
    predict = torch.zeros_like(batch["option_mask"], device=dev)
    predict[:, :-1] = scored                      # logits at t predict token t + 1
    targets = ids[:, 1:][scored]
    logits = kept_logits(model, ids, attn, predict, batch.get("pack", False))
    logp = logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return logp, predict.nonzero()[:, 0]


def shared_option_scores(model, batch: dict) -> torch.Tensor:
    """[B, max options] log-probabilities of each example's option tokens after its prompt (one forward
    per example; padded options are -inf)."""
    dev = _device(model)
    ids, attn = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    last = torch.zeros_like(attn, dtype=torch.bool)
    last[torch.arange(ids.shape[0], device=dev), attn.sum(1) - 1] = True  # right-padded: the last real token
    logits = kept_logits(model, ids, attn, last, batch.get("pack", False))  # token_logprobs' arithmetic
    options = batch["option_ids"].to(dev)
    scores = logits.gather(1, options) - torch.logsumexp(logits, dim=-1, keepdim=True)
    width = torch.arange(options.shape[1], device=dev)
    return scores.masked_fill(width[None, :] >= batch["n_options"].to(dev)[:, None], float("-inf"))


def grouped_scores(model, batch: dict) -> torch.Tensor:
    """[B, max options] score of each example's options, whichever way the batch was encoded."""
    if "option_ids" in batch:
        return shared_option_scores(model, batch)
    return _grouped(option_scores(model, batch), batch["n_options"])


def option_scores(model, batch: dict) -> torch.Tensor:
    """Mean log-probability of each sequence's option tokens (MeZO's length-normalized score), [S]."""
    logp, seq = token_logprobs(model, batch)
    n_seq = batch["input_ids"].shape[0]
    sums = torch.zeros(n_seq, dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)
    counts = batch["option_mask"][:, 1:].sum(1).clamp(min=1).to(logp.device)
    return sums / counts


def _grouped(scores: torch.Tensor, n_options: torch.Tensor) -> torch.Tensor:
    """[S] scores -> [B, max options], padded with -inf where an example has fewer options."""
    n_options = n_options.to(scores.device)
    b, width = n_options.numel(), int(n_options.max())
    if bool((n_options == width).all()):
        return scores.view(b, width)
    row = torch.repeat_interleave(torch.arange(b, device=scores.device), n_options)
    col = torch.arange(scores.numel(), device=scores.device) - torch.repeat_interleave(
        torch.cumsum(n_options, 0) - n_options, n_options)
    return scores.new_full((b, width), float("-inf")).index_put((row, col), scores)


def loss(model, batch: dict) -> torch.Tensor:
    """Scalar loss: cross-entropy over option scores (classification), else mean NLL of target tokens.

    The LM form averages over all target tokens of the batch, as MeZO's CrossEntropyLoss does.
    """
    if "n_options" in batch:
        scores = grouped_scores(model, batch)
        return F.cross_entropy(scores, batch["labels"].to(scores.device))
    logp, _ = token_logprobs(model, batch)
    return -logp.mean()


def _chunks(items: list, size: int):
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + max(1, size)]


def candidate_scores(model, tokenizer, examples: list[Example], batch_size: int = 16, max_length: int = 256,
                     vocab_size: int | None = None, shared: bool = False, pack: bool = False) -> torch.Tensor:
    """Every classification example's per-option scores (mean log-prob of each option), [N, options]."""
    out = []
    with torch.inference_mode():
        for chunk in _chunks(examples, batch_size):
            batch = encode(chunk, tokenizer, "classification", max_length, train=False, vocab_size=vocab_size,
                           shared=shared, pack=pack)
            out.append(grouped_scores(model, batch).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def predict(model, tokenizer, examples: list[Example], batch_size: int = 16, max_length: int = 256,
            vocab_size: int | None = None, shared: bool = False, pack: bool = False) -> list[int]:
    """The index of the best-scoring candidate for each classification example."""
    return candidate_scores(model, tokenizer, examples, batch_size, max_length, vocab_size, shared,
                            pack).argmax(1).tolist()


def greedy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, stops: list[int],
           pad: int) -> list[list[int]]:
    """Greedy continuations of a left-padded batch: each row's new token ids, cut before its first stop."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad)
    rows = out[:, input_ids.shape[1]:].tolist()
    return [row[:next((i for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def generate(model, tokenizer, examples: list[Example], batch_size: int = 16, max_length: int = 256,
             max_new_tokens: int = 50, vocab_size: int | None = None) -> list[str]:
    """Greedy answers, one line each. The prompt is cut from the left to leave room for the answer."""
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    stops = [newline] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    pad = padding_id(tokenizer)
    if vocab_size:
        stops, pad = [s % vocab_size for s in stops], pad % vocab_size
    dev, texts, known = _device(model), [], len(tokenizer)
    with torch.inference_mode():
        for chunk in _chunks(examples, batch_size):
            batch = encode(chunk, tokenizer, "generation", max(1, max_length - max_new_tokens), train=False,
                           vocab_size=vocab_size)
            for row in greedy(model, batch["input_ids"].to(dev), batch["attention_mask"].to(dev), max_new_tokens,
                              stops, pad):
                text = tokenizer.decode([t for t in row if t < known], skip_special_tokens=True)
                # MeZO stops on the "\n" token only; a token that merely contains a newline (".\n") would
                # run on, so the text is also cut at its first newline.
                texts.append(text.split("\n")[0].strip())
    return texts


def evaluate(model, tokenizer, task_kind: str, examples: list[Example], batch_size: int = 16,
             max_length: int = 256, max_new_tokens: int = 50, vocab_size: int | None = None,
             shared: bool = False, pack: bool = False, details: dict | None = None) -> dict:
    """{"accuracy"} for classification, {"em", "f1"} (SQuAD-style, best over gold answers) for generation.

    ``details`` (a dict), when given, receives the per-example predictions the scores come from, as
    arrays: ``id`` (``Example.id``), and ``gold``, ``pred`` and ``scores`` [N, options] for classification,
    or ``pred`` (the generated text), ``em`` and ``f1`` for generation. Kept beside a record, they let a
    paired test be run after the fact (``zobench.analysis.stats``)."""
    if task_kind not in KINDS:
        raise UserError(f"unknown task kind '{task_kind}' (expected {' or '.join(KINDS)})")
    ids = np.array([-1 if ex.id is None else int(ex.id) for ex in examples], dtype=np.int64)
    if task_kind == "classification":
        if not examples:
            return {"accuracy": None}
        scores = candidate_scores(model, tokenizer, examples, batch_size, max_length, vocab_size, shared, pack)
        preds = scores.argmax(1).numpy()
        gold = np.array([ex.label for ex in examples], dtype=np.int64)
        if details is not None:
            details.update(id=ids, gold=gold, pred=preds.astype(np.int64), scores=scores.numpy())
        return {"accuracy": int((preds == gold).sum()) / len(examples)}
    if not examples:
        return {"em": None, "f1": None}
    texts = generate(model, tokenizer, examples, batch_size, max_length, max_new_tokens, vocab_size)
    em = np.array([exact_match(t, ex.answers) for t, ex in zip(texts, examples)], dtype=np.float64)
    f1 = np.array([f1_score(t, ex.answers) for t, ex in zip(texts, examples)], dtype=np.float64)
    if details is not None:
        details.update(id=ids, pred=np.array(texts, dtype=np.str_), em=em, f1=f1)
    # summed in order, as before per-example arrays were kept: the same scores to the last bit
    return {"em": sum(em.tolist()) / len(examples), "f1": sum(f1.tolist()) / len(examples)}
