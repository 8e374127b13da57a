"""What a method sees of a cell (``Run``): its config, device, task and data, the loaded model and the
parameters in scope, the mask; and the cell's seeded batch stream."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from zobench.fingerprint import weights_fingerprint
from zobench.quant.sparse import attach_sparse, split_selected
from zobench.spec.config import CellConfig
from zobench.tasks import responses, scoring
from zobench.tasks.instruction import epoch_batches, random_order


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

    @staticmethod
    def of(cfg: CellConfig, device: str, task, splits, **kw) -> "Run":
        """The Run for ``task``'s kind: MeZO's classification and generation (``tasks.scoring``), or
        instruction tuning (``InstructionRun``)."""
        return (InstructionRun if task.kind == "instruction" else Run)(cfg, device, task, splits, **kw)

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

    def count_truncated(self, examples, train: bool) -> int:
        return scoring.count_truncated(examples, self.tokenizer, self.task.kind, self.cfg.max_length, train=train)

    def evaluate(self, examples, details: dict | None = None) -> dict:
        """The split's scores; ``details`` receives its per-example predictions (``scoring.evaluate``)."""
        return scoring.evaluate(self.model, self.tokenizer, self.task.kind, examples,
                                batch_size=self.cfg.eval_batch_size, max_length=self.cfg.max_length,
                                vocab_size=self.vocab, shared=self.cfg.shared_prompt, pack=self.cfg.pack,
                                details=details)

    def params_fingerprint(self) -> str:
        """The identity of the weights in scope (what a mask is cached under); a streamed model's deferred
        linears read as if drawn (``models.stream.Deferred.fingerprint``): the same as the float model's."""
        if self.loaded.deferred is None:
            return weights_fingerprint(self.params)
        return self.loaded.deferred.fingerprint(self.model, self.params)

    def batches(self, seed: int | None = None) -> Iterator[list]:
        return batch_stream(self.splits.train, self.cfg.batch_size, self.cfg.seed if seed is None else seed)


class InstructionRun(Run):
    """An instruction-tuning cell (``tasks.instruction``): batches of prompt + response with the loss on the
    response tokens (``tasks.responses``), evaluated by that loss. Batches walk seeded epochs of the train
    rows (every row seen equally often), shuffled as each kind of fine-tune always has: a first-order one
    with ``torch.randperm`` (a torch DataLoader's order), a ZO one with ``random.Random``."""

    @staticmethod
    def loss_fn(model, batch):
        return responses.loss(model, batch)

    def encode(self, examples, train: bool = True) -> dict:
        return responses.encode_batch(examples, self.tokenizer, self.cfg.max_length, self.vocab)

    def count_truncated(self, examples, train: bool) -> int:
        return responses.count_truncated(examples, self.tokenizer, self.cfg.max_length)

    def evaluate(self, examples, details: dict | None = None) -> dict:
        return responses.evaluate(self.model, self.tokenizer, examples, self.cfg.eval_batch_size,
                                  self.cfg.max_length, self.vocab, details)

    def batches(self, seed: int | None = None) -> Iterator[list]:
        seed = self.cfg.seed if seed is None else seed
        shuffled = responses.torch_order(seed) if self.cfg.method_info.family == "fo" else random_order(seed)
        return epoch_batches(self.splits.train, self.cfg.batch_size, shuffled)


def quantize_streamed(run: Run, backend, ctx, mask: dict | None = None) -> list[tuple[str, torch.Tensor]]:
    """Draw each deferred block linear of ``run``'s streamed model and quantize it before drawing the next.
    With a ``mask``, the layer's masked entries are first taken out of its drawn weight and kept beside the
    quantized layer (``quant.sparse``), as ``quant.quantize_model`` does for a whole model: the same values,
    in the same order. Returns those value vectors (empty without a mask)."""
    model, mask = run.model, mask or {}
    merge = backend.dequantize if backend.merges_on(str(ctx.device)) else None
    vectors = []
    for name in run.loaded.deferred.arrive(model):
        linear = model.get_submodule(name)
        shape = {name: (linear.out_features, linear.in_features)}
        del linear
        pname = f"{name}.weight"
        taken = split_selected(model, {pname: mask[pname]} if pname in mask else {})
        backend.quantize(model, [name], ctx)
        vectors += attach_sparse(model, taken, shape, ctx.dtype, merge)
    run.loaded.deferred = None
    return vectors
