"""First-order training for the baselines (full fine-tuning with SGD or AdamW, LoRA): same loss, batches
and ``StepResult`` as the ZO trainer, so suites put a backward pass's memory and time beside the
forward-only methods."""

from __future__ import annotations

import time
from typing import Callable

import torch

from zobench.zo.trainer import Stepper, StepResult, _sync

OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


class FOTrainer(Stepper):
    """Backprop on every parameter of ``model`` that requires grad."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, optimizer: str, lr: float,
                 weight_decay: float = 0.0):
        self.model, self.loss_fn = model, loss_fn
        params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in params)
        self.opt = OPTIMIZERS[optimizer](params, lr=lr, weight_decay=weight_decay)
        self.device = next(model.parameters()).device

    def flush(self) -> None:
        """Nothing is pending: every step's update is applied in the step."""

    def step(self, batch, step: int) -> StepResult:
        self.model.train()
        sec = {}
        _sync(self.device)
        t = time.perf_counter()
        loss = self.loss_fn(self.model, batch)
        _sync(self.device)
        sec["forward"] = time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        _sync(self.device)
        sec["backward"] = time.perf_counter() - t
        t = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        sec["update"] = time.perf_counter() - t
        self.model.eval()
        return StepResult(float(loss.detach()), [], sec)
