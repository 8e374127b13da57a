"""`zobench influence train`: fine-tune on an instruction file and keep the result as a delta.

The influence commands explain a fine-tuned model; this makes one from the command line, on the same
Alpaca-format rows the cache reads, with the response-only loss influence is measured on:

    lora       first-order LoRA (AdamW on the adapter, ``poison.finetune_lora``): a ``lora`` delta
    sensitive  ZO-SGD on the 0.1% of the linear weights with the largest squared gradients on C4
    random     ZO-SGD on 0.1% drawn uniformly (seeded)

A sparse delta's indices are the subspace that was trained, so ``influence cache --delta DIR --scope
sensitive`` asks "which rows moved the weights I tuned?" in exactly that subspace.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch

from zobench.cell.delta_tensors import base_fingerprint
from zobench.cell.delta_tensors import save as save_delta
from zobench.cell.keep import sparse_tensors
from zobench.errors import UserError
from zobench.files import cache_dir
from zobench.influence.data import collate, encode, format_prompt, response_loss
from zobench.influence.poison import _pad_id, finetune_lora
from zobench.methods.masked import sensitive_mask
from zobench.models import load_model
from zobench.zo.masks import random_mask, scoped_params
from zobench.zo.optim import make_optimizer
from zobench.zo.trainable import SparseTrainable
from zobench.zo.trainer import ZOTrainer

METHODS = ("lora", "sensitive", "random")


def train_on_instructions(model: str, examples: list[dict], method: str, steps: int, lr: float, save: str,
                          batch_size: int = 8, max_length: int = 128, density: float = 1e-3, eps: float = 1e-3,
                          seed: int = 0, data: str | None = None, data_dir: str | None = None,
                          overwrite: bool = False, on_log: Callable[[int, float], None] | None = None) -> dict:
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
    trainable, mask_info = _sparse_trainable(loaded, method, density, seed, data_dir)
    losses, seconds = _zo_steps(loaded, trainable, examples, steps, lr, eps, batch_size, max_length, seed, on_log)
    artifact = save_delta(save, "sparse", cfg, fingerprint, steps, tensors=sparse_tensors(trainable, loaded.model),
                          extra={"mask": mask_info}, overwrite=overwrite)
    return {"artifact": artifact, "losses": losses, "train_s": seconds, "trainable": trainable.numel}


def _sparse_trainable(loaded, method: str, density: float, seed: int, data_dir: str | None):
    params = scoped_params(loaded.model, "linear")
    if method == "sensitive":  # the cell's defaults: 16 C4 sequences of 256 tokens
        mask, info = sensitive_mask(loaded.model, loaded.tokenizer, params, density, 16, 256, data_dir, cache_dir(),
                                    loaded.vocab_size if loaded.random_weights else None)
        for p in loaded.model.parameters():
            p.grad = None
    else:
        mask, info = random_mask(params, density, seed), {}
    kept = {k: v for k, v in (info or {}).items() if isinstance(v, (str, int, float))}
    return SparseTrainable(params, mask, "gaussian", "philox"), {"method": method, **kept}


def _zo_steps(loaded, trainable, examples, steps, lr, eps, batch_size, max_length, seed, on_log):
    """MeZO's ZO-SGD on the response loss, batches drawn as ``finetune_lora`` draws them."""
    tok, model = loaded.tokenizer, loaded.model
    model.eval()
    encoded = [encode(tok, format_prompt(e), e["output"], max_length) for e in examples]
    trainer = ZOTrainer(model, trainable, make_optimizer("sgd", lr, total_steps=steps),
                        lambda m, batch: response_loss(m, *collate(batch, _pad_id(tok))), eps, 1, seed)
    order, rng, losses, start = [], random.Random(seed), [], time.perf_counter()
    for step in range(steps):
        batch = []
        while len(batch) < min(batch_size, len(encoded)):
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            batch.append(encoded[order.pop()])
        losses.append(trainer.step(batch, step).loss)
        if not torch.isfinite(torch.tensor(losses[-1])):
            raise UserError(f"influence train: the loss became {losses[-1]} at step {step}; lower --lr")
        if on_log is not None and (step % 10 == 0 or step == steps - 1):
            on_log(step, losses[-1])
    return losses, time.perf_counter() - start
