"""First-order baselines for context: full fine-tuning (SGD / Adam) and LoRA (peft).

They use the same loss, batches and ``StepResult`` as the ZO trainer, so the suites can put a backward
pass's memory and time beside the forward-only methods.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from zobench.errors import UserError
from zobench.zo.trainer import StepResult, _sync

FO_METHODS = ("fo-sgd", "fo-adam", "lora")


class FOTrainer:
    def __init__(self, model: torch.nn.Module, loss_fn: Callable, method: str, lr: float,
                 weight_decay: float = 0.0, lora_r: int = 8, lora_alpha: int = 16,
                 lora_targets: tuple[str, ...] = ("q_proj", "v_proj")):
        if method not in FO_METHODS:
            raise UserError(f"unknown first-order method '{method}' (expected one of: {', '.join(FO_METHODS)})")
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            from zobench.models.lora import dispatchable

            model = get_peft_model(model, dispatchable(LoraConfig(r=lora_r, lora_alpha=lora_alpha,
                                                                  target_modules=list(lora_targets),
                                                                  lora_dropout=0.0)))
        self.model, self.loss_fn = model, loss_fn
        params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in params)
        if method == "fo-sgd":
            self.opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.device = next(model.parameters()).device

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
        return StepResult(float(loss), [], sec)
