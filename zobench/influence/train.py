"""`zobench influence train`: fine-tune on an instruction file and keep the result as a delta.

The influence commands explain a fine-tuned model; this makes one from the command line, on the same
Alpaca-format rows the cache reads, with the response-only loss influence is measured on:

    lora       first-order LoRA (AdamW on the adapter, ``finetune_lora``): a ``lora`` delta
    sensitive  ZO-SGD on the 0.1% of the linear weights with the largest squared gradients on C4
    random     ZO-SGD on 0.1% drawn uniformly (seeded)

Training is a suite cell's: the method comes from the methods registry, which builds its mask and its
stepper from a ``cell.run.Run``, and the engine's loop (``zo.trainer.train_steps``) steps it. What is
influence's own is the data: ``InstructionRun`` is a Run whose batches are instruction rows and whose loss
is on the response tokens.

A sparse delta's indices are the subspace that was trained, so ``influence cache --delta DIR --scope
sensitive`` asks "which rows moved the weights I tuned?" in exactly that subspace.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from zobench.cell.delta_tensors import base_fingerprint
from zobench.cell.delta_tensors import save as save_delta
from zobench.cell.keep import sparse_tensors
from zobench.cell.run import Run
from zobench.errors import UserError
from zobench.files import cache_dir
from zobench.influence.data import (
    collate,
    encode,
    epoch_batches,
    format_prompt,
    random_order,
    response_loss,
    torch_order,
)
from zobench.methods import get_method
from zobench.models import load_model
from zobench.spec.config import CellConfig
from zobench.tasks.scoring import padding_id
from zobench.zo.masks import scoped_params
from zobench.zo.trainer import train_steps

METHODS = ("lora", "sensitive", "random")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ORDERS = {"random": random_order, "torch": torch_order}  # how each fine-tune has always shuffled its rows

Logger = Callable[[int, float], None]


@dataclass
class InstructionRun(Run):
    """What a method sees of an instruction fine-tune: batches walk seeded epochs of the encoded rows
    (``epoch_batches``), a batch is collated right-padded, and the loss is the response tokens' only."""

    rows: list = field(default_factory=list)   # ``influence.data.encode`` of each example
    order: str = "random"                      # ORDERS

    @staticmethod
    def loss_fn(model, batch):
        return response_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])

    def encode(self, rows, train: bool = True) -> dict:
        ids, attn, labels = collate(rows, padding_id(self.tokenizer))
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    def batches(self, seed: int | None = None):
        shuffled = ORDERS[self.order](self.cfg.seed if seed is None else seed)
        return epoch_batches(self.rows, self.cfg.batch_size, shuffled)


def instruction_run(loaded, examples: list[dict], method: str, *, steps: int, batch_size: int, lr: float,
                    max_length: int, seed: int, order: str, density: float = 1e-3, eps: float = 1e-3,
                    data_dir: str | None = None) -> InstructionRun:
    """An ``InstructionRun`` of ``method`` on ``loaded`` (float32, on its CPU): ZO-SGD on the linear layers
    with gaussian philox directions, or AdamW; masks cached as a cell's are."""
    cfg = CellConfig(model=loaded.spec, method=method, device="cpu", n_train=len(examples), max_length=max_length,
                     batch_size=batch_size, density=density, scope="linear", steps=steps, lr=lr, eps=eps,
                     optimizer="sgd", direction="gaussian", generator="philox", seed=seed, data_dir=data_dir,
                     eval_before=False, eval_after=False, warmup_steps=0)
    tok = loaded.tokenizer
    rows = [encode(tok, format_prompt(e), e["output"], max_length) for e in examples]
    return InstructionRun(cfg, "cpu", None, None, loaded=loaded, cache_root=cache_dir(), rows=rows, order=order)


def fit(run: Run, stepper, steps: int, on_log: Logger | None = None, log_every: int = 10) -> tuple[list, float]:
    """``steps`` steps of ``stepper`` on the run's batches (the engine's loop), the last update applied:
    (the loss of each step, seconds). A loss that is no longer finite stops the run with one line."""
    losses, start = [], time.perf_counter()
    for i, _, res in train_steps(stepper, run.batches(), range(steps), run.encode):
        losses.append(res.loss)
        if not math.isfinite(res.loss):
            raise UserError(f"influence train: the loss became {res.loss} at step {i}; lower --lr")
        if on_log is not None and (i % max(1, log_every) == 0 or i == steps - 1):
            on_log(i, res.loss)
    stepper.flush()
    return losses, time.perf_counter() - start


def finetune_lora(loaded, examples: list[dict], *, steps: int, batch_size: int, lr: float, max_length: int,
                  r: int = 8, alpha: int = 16, targets: tuple[str, ...] = LORA_TARGETS, seed: int = 0,
                  log_every: int = 10, on_log: Logger | None = None) -> dict:
    """Fine-tune a LoRA adapter (dropout 0) on the response loss of ``examples``; AdamW on the adapter only
    (the registry's ``lora`` method with this adapter shape, its A matrices drawn with ``seed``).

    ``loaded.model`` becomes the peft model, in eval mode. Batches walk seeded shuffles of the examples,
    one epoch after another, so every example is seen equally often. Returns {losses (one per step),
    finetune_s, trainable (adapter parameter count)}.
    """
    if hasattr(loaded.model, "peft_config"):
        raise UserError(f"model '{loaded.spec}' already carries a LoRA adapter; load the base model to fine-tune")
    if not examples:
        raise UserError("finetune_lora: no training examples")
    run = instruction_run(loaded, examples, "lora", steps=steps, batch_size=batch_size, lr=lr,
                          max_length=max_length, seed=seed, order="torch")
    run.lora = (r, alpha, targets, seed)
    stepper, _ = get_method("lora").build_stepper(run)
    loaded.model = stepper.model
    losses, seconds = fit(run, stepper, steps, on_log, log_every)
    return {"losses": losses, "finetune_s": seconds, "trainable": stepper.numel}


def finetune_zo(loaded, examples: list[dict], method: str, *, steps: int, batch_size: int, lr: float,
                max_length: int, density: float, eps: float, seed: int, data_dir: str | None = None,
                on_log: Logger | None = None) -> dict:
    """MeZO's ZO-SGD on the response loss of ``examples``, on the ``density`` of the linear weights that the
    mask method ``method`` (random, sensitive) picks. Returns {losses, train_s, trainable (the method's
    trainable set, trained), mask (what the method reported of its mask)}."""
    run = instruction_run(loaded, examples, method, steps=steps, batch_size=batch_size, lr=lr,
                          max_length=max_length, seed=seed, order="random", density=density, eps=eps,
                          data_dir=data_dir)
    loaded.model.eval()
    run.params = scoped_params(loaded.model, "linear")
    chosen = get_method(method)
    run.mask, info = chosen.build_mask(run)
    stepper, trainable = chosen.build_stepper(run)
    losses, seconds = fit(run, stepper, steps, on_log)
    kept = {k: v for k, v in (info or {}).items() if isinstance(v, (str, int, float))}
    return {"losses": losses, "train_s": seconds, "trainable": trainable, "mask": {"method": method, **kept}}


def train_on_instructions(model: str, examples: list[dict], method: str, steps: int, lr: float, save: str,
                          batch_size: int = 8, max_length: int = 128, density: float = 1e-3, eps: float = 1e-3,
                          seed: int = 0, data: str | None = None, data_dir: str | None = None,
                          overwrite: bool = False, on_log: Logger | None = None) -> dict:
    """Train, save the delta at ``save`` and return ``{artifact, losses, train_s, trainable}``."""
    if method not in METHODS:
        raise UserError(f"influence train: --method '{method}': expected one of {', '.join(METHODS)}")
    if steps < 1 or not examples:
        raise UserError("influence train: needs at least one step and one example")
    loaded = load_model(model, dtype="float32")
    fingerprint = base_fingerprint(loaded.model)
    cfg = {"model": model, "method": method, "data": data, "n_train": len(examples), "steps": steps, "lr": lr,
           "batch_size": batch_size, "max_length": max_length, "seed": seed, "quant": "none", "dtype": "float32",
           "loss": "response"}
    if method == "lora":
        stats = finetune_lora(loaded, examples, steps=steps, batch_size=batch_size, lr=lr, max_length=max_length,
                              seed=seed, on_log=on_log)
        artifact = save_delta(save, "lora", cfg, fingerprint, steps, adapter_model=loaded.model,
                              overwrite=overwrite)
        return {"artifact": artifact, "losses": stats["losses"], "train_s": stats["finetune_s"],
                "trainable": stats["trainable"]}
    cfg.update(density=density, eps=eps, scope="linear", optimizer="sgd", direction="gaussian", generator="philox")
    out = finetune_zo(loaded, examples, method, steps=steps, batch_size=batch_size, lr=lr, max_length=max_length,
                      density=density, eps=eps, seed=seed, data_dir=data_dir, on_log=on_log)
    trainable = out["trainable"]
    artifact = save_delta(save, "sparse", cfg, fingerprint, steps, tensors=sparse_tensors(trainable, loaded.model),
                          extra={"mask": out["mask"]}, overwrite=overwrite)
    return {"artifact": artifact, "losses": out["losses"], "train_s": out["train_s"], "trainable": trainable.numel}
