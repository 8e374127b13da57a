"""Optimizers on the trainable values, fed the ZO gradient estimate one chunk at a time.

A chunk is one weight tensor (dense) or the flat vector of selected values (sparse); state (momentum,
Adam moments) exists only for trainable values, keyed by chunk, and is allocated on first use.
"""

from __future__ import annotations

import torch

from zobench.errors import UserError


class ZOOptimizer:
    # The update is w <- w * (1 - lr wd) - lr g with no state: a trainable may run it inside its fused pass
    # (zobench.zo.fused) on the terms of g instead of handing over g.
    plain = True

    def __init__(self, lr: float, weight_decay: float = 0.0, schedule: str = "constant", total_steps: int = 1):
        if schedule not in ("constant", "linear"):
            raise UserError(f"unknown lr schedule '{schedule}' (expected constant or linear)")
        self.base_lr, self.weight_decay, self.schedule = lr, weight_decay, schedule
        self.total_steps = max(1, total_steps)
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def lr(self, step: int) -> float:
        if self.schedule == "linear":
            return self.base_lr * max(0.0, 1.0 - step / self.total_steps)
        return self.base_lr

    def update(self, key: int, values: torch.Tensor, grad: torch.Tensor, step: int, decay: bool = True) -> None:
        """Update ``values`` in place from ``grad`` (which may be overwritten)."""
        lr = self.lr(step)
        if decay and self.weight_decay:
            values.mul_(1.0 - lr * self.weight_decay)
        self._step(key, values, grad, step, lr)

    def _step(self, key, values, grad, step, lr):
        values.add_(grad, alpha=-lr)


class ZOSGD(ZOOptimizer):
    """MeZO's ZO-SGD: w <- w - lr * (g z + wd w)."""


class ZOMomentum(ZOOptimizer):
    plain = False

    def __init__(self, lr: float, momentum: float = 0.9, **kw):
        super().__init__(lr, **kw)
        self.momentum = momentum

    def _step(self, key, values, grad, step, lr):
        buf = self.state.setdefault(key, {}).get("buf")
        if buf is None:
            buf = self.state[key]["buf"] = grad.to(values.dtype).clone()
        else:
            buf.mul_(self.momentum).add_(grad)
        values.add_(buf, alpha=-lr)


class ZOAdam(ZOOptimizer):
    plain = False

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8, **kw):
        super().__init__(lr, **kw)
        self.betas, self.adam_eps = betas, adam_eps

    def _step(self, key, values, grad, step, lr):
        st = self.state.setdefault(key, {})
        if "m" not in st:
            st["m"] = torch.zeros_like(values, dtype=torch.float32)
            st["v"] = torch.zeros_like(values, dtype=torch.float32)
        b1, b2 = self.betas
        grad = grad.float()
        st["m"].mul_(b1).add_(grad, alpha=1 - b1)
        st["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = step + 1
        denom = (st["v"] / (1 - b2**t)).sqrt_().add_(self.adam_eps)
        values.addcdiv_(st["m"].to(values.dtype), denom.to(values.dtype), value=-lr / (1 - b1**t))


OPTIMIZERS = {"sgd": ZOSGD, "momentum": ZOMomentum, "adam": ZOAdam}


def make_optimizer(name: str, lr: float, weight_decay: float = 0.0, schedule: str = "constant",
                   total_steps: int = 1, momentum: float = 0.9) -> ZOOptimizer:
    if name not in OPTIMIZERS:
        raise UserError(f"unknown ZO optimizer '{name}' (expected one of: {', '.join(OPTIMIZERS)})")
    kw = dict(weight_decay=weight_decay, schedule=schedule, total_steps=total_steps)
    if name == "momentum":
        kw["momentum"] = momentum
    return OPTIMIZERS[name](lr, **kw)

