"""`zobench influence train`: fine-tune on an instruction file and keep the result as a delta.

The influence commands explain a fine-tuned model; this makes one from the command line, on the same
Alpaca-format rows the cache reads, with the response-only loss influence is measured on:

    lora       first-order LoRA (AdamW on the adapter): a ``lora`` delta
    sensitive  ZO-SGD on the 0.1% of the linear weights with the largest squared gradients on C4
    random     ZO-SGD on 0.1% drawn uniformly (seeded)

A fine-tune is a cell like a suite's: task ``alpaca`` on the caller's rows (``Alpaca.splits_of``), run by
``cell.pipeline`` with the methods registry, measured phase by phase, kept by the cell (``save``) and
described by its ``CellRecord``. What is influence's own here is only the choice of settings.

A sparse delta's indices are the subspace that was trained, so ``influence cache --delta DIR --scope
sensitive`` asks "which rows moved the weights I tuned?" in exactly that subspace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from zobench.cell.pipeline import run_cell
from zobench.cell.record import CellRecord
from zobench.errors import UserError
from zobench.procs import malloc_in_effect
from zobench.spec.config import CellConfig
from zobench.tasks.instruction import Alpaca

METHODS = ("lora", "sensitive", "random")
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"  # every attention projection, as RapidIn's fine-tunes

Logger = Callable[[int, float], None]


def fine_tune_config(model: str, n_train: int, method: str, *, steps: int, batch_size: int, lr: float,
                     max_length: int, seed: int = 0, density: float = 1e-3, eps: float = 1e-3, r: int = 8,
                     alpha: int = 16, data_dir: str | None = None, save: str | None = None,
                     overwrite: bool = False) -> CellConfig:
    """The cell of an instruction fine-tune on ``n_train`` rows: float32 on this CPU, no evaluation, every
    step timed; ZO-SGD with gaussian philox directions on the linear layers, or AdamW on a LoRA adapter
    (rank ``r``, ``alpha``, every attention projection). No reference forwards: a fine-tune here makes a
    model to explain, it is not a speed measurement."""
    if method not in METHODS:
        raise UserError(f"influence train: --method '{method}': expected one of {', '.join(METHODS)}")
    if steps < 1 or n_train < 1:
        raise UserError("influence train: needs at least one step and one example")
    return CellConfig.from_dict(dict(
        model=model, task="alpaca", method=method, device="cpu", dtype="float32", n_train=n_train, n_dev=0,
        n_test=0, max_length=max_length, batch_size=batch_size, density=density, scope="linear", steps=steps,
        lr=lr, eps=eps, optimizer="sgd", direction="gaussian", generator="philox", seed=seed, data_dir=data_dir,
        eval_before=False, eval_after=False, warmup_steps=0, ref_every=steps + 1, lora_r=r, lora_alpha=alpha,
        lora_targets=LORA_TARGETS, save=save, overwrite=overwrite), "influence train")


def fine_tune(cfg: CellConfig, examples: list[dict], on_log: Logger | None = None,
              log_every: int = 10) -> CellRecord:
    """Run the fine-tune cell ``cfg`` on ``examples`` (``load_alpaca``'s rows, in their order); its record.
    ``on_log(i, loss)`` every ``log_every`` steps (0-based i) and at the last; a loss that is no longer
    finite stops the run with one line."""

    def progress(event: dict) -> None:
        i, loss = event["step"] - 1, event["loss"]
        if not math.isfinite(loss):
            raise UserError(f"influence train: the loss became {loss} at step {i}; lower --lr")
        if on_log is not None and (i % max(1, log_every) == 0 or i == cfg.steps - 1):
            on_log(i, loss)

    cfg = replace(cfg, malloc=malloc_in_effect())  # it runs in this process: its record says under which malloc
    return run_cell(cfg, progress, Alpaca().splits_of(examples))


def summary(record: CellRecord) -> dict:
    """What the influence report reads of a fine-tune's record: the losses, the training seconds, the
    values trained and the kept artifact's size."""
    m = record.metrics
    losses = m.get("loss_curve")
    return {"train_s": m.get("train_s"), "loss_first": losses[0], "loss_last": losses[-1],
            "trainable": m.get("trainable_numel"),
            "artifact_bytes": record.artifact["bytes"] if record.artifact else None}
