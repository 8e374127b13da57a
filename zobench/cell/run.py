"""What a method sees of a cell (``Run``): its config, device, task and data, the loaded model and the
parameters in scope, the mask; and the cell's seeded batch stream."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from zobench.fingerprint import fingerprint_of_heads, head
from zobench.spec.config import CellConfig
from zobench.tasks import scoring


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def batch_stream(examples: list, batch_size: int, seed: int) -> Iterator[list]:
    """Shuffled batches, reshuffled each epoch, from a seeded RNG (same seed -> same batches)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]
        if len(order) < batch_size:
            yield [examples[j] for j in order]


@dataclass
class Run:
    """The state of one cell that methods build on (see ``zobench.methods.base``)."""

    cfg: CellConfig
    device: str
    task: Any
    splits: Any
    loaded: Any = None              # zobench.models.load.LoadedModel
    params: list = field(default_factory=list)   # (name, parameter) in the method's scope
    mask: dict | None = None        # flat indices per tensor (mask methods)
    vectors: list | None = None     # the trainable values beside quantized layers (quantized mask methods)
    cache_root: Path | None = None
    lora: tuple | None = None       # (r, alpha, target modules, seed of A's draw): the lora method's adapter
                                    # where the caller sets one (influence's fine-tune), else its defaults

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def vocab(self) -> int | None:
        """Random-weight models borrow the embedded tokenizer: token ids are folded into their vocabulary."""
        return self.loaded.vocab_size if self.loaded.random_weights else None

    @staticmethod
    def loss_fn(model, batch):
        return scoring.loss(model, batch)

    def encode(self, examples, train: bool = True) -> dict:
        return scoring.encode(examples, self.tokenizer, self.task.kind, max_length=self.cfg.max_length,
                              train=train, vocab_size=self.vocab, shared=self.cfg.shared_prompt, pack=self.cfg.pack)

    def evaluate(self, examples, details: dict | None = None) -> dict:
        """The split's scores; ``details`` receives its per-example predictions (``scoring.evaluate``)."""
        return scoring.evaluate(self.model, self.tokenizer, self.task.kind, examples,
                                batch_size=self.cfg.eval_batch_size, max_length=self.cfg.max_length,
                                vocab_size=self.vocab, shared=self.cfg.shared_prompt, pack=self.cfg.pack,
                                details=details)

    def batches(self, seed: int | None = None) -> Iterator[list]:
        return batch_stream(self.splits.train, self.cfg.batch_size, self.cfg.seed if seed is None else seed)


def quantize_streamed(run: Run, backend, ctx) -> str:
    """Draw each deferred block linear of ``run``'s streamed model and quantize it before drawing the next;
    returns the base's fingerprint as a delta's load computes it from the float model (each arriving weight's
    head is kept before it is quantized)."""
    model = run.model
    order = [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]
    heads = {}
    for name in run.loaded.deferred.arrive(model):
        heads.update({f"{name}.{k}": head(p).clone() for k, p in model.get_submodule(name).named_parameters()})
        backend.quantize(model, [name], ctx)
    run.loaded.deferred = None
    now = dict(model.named_parameters())
    return fingerprint_of_heads((n, shape, dtype, heads[n] if n in heads else head(now[n]))
                                for n, shape, dtype in order)
