"""What several ZO methods share: the ZO step loop around a trainable, and the price of dense passes."""

from __future__ import annotations

from zobench.methods.base import Price, PriceInputs
from zobench.zo.optim import make_optimizer
from zobench.zo.sizes import CHUNK, OPT_STATE_VALUES, RADEMACHER_EXTRA_BYTES
from zobench.zo.trainer import ZOTrainer


def zo_stepper(run, trainable, clip: float | None = None):
    """MeZO's ZO-SGD (or momentum / Adam) on ``trainable``: ``(stepper, trainable)``; ``clip`` bounds the
    directional derivative (``zo.trainer.ZOTrainer``)."""
    cfg = run.cfg
    opt = make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.steps, cfg.momentum)
    return ZOTrainer(run.model, trainable, opt, run.loss_fn, cfg.eps, cfg.q, cfg.seed, clip=clip), trainable


def z_extra(cfg) -> float:
    """Bytes per value drawn beside z itself (the Rademacher sign table's index and random words)."""
    return RADEMACHER_EXTRA_BYTES if cfg.direction == "rademacher" else 0.0


def dense_price(inputs: PriceInputs) -> Price:
    """Every value of the scope perturbed in place, z drawn chunk by chunk (``zo.trainable.DenseTrainable``)."""
    cfg, db, tensors = inputs.cfg, inputs.dtype_bytes, inputs.scope_sizes
    nnz = sum(tensors)
    zb = 4 if cfg.master_fp32 else db  # z is drawn in the dtype it is added in
    state_bytes = 4 if cfg.master_fp32 or cfg.optimizer == "adam" else db
    chunk = min(CHUNK, max(tensors, default=0))
    # q z chunks side by side in the update, plus master.add(z) (master) or Adam's denominator.
    update = chunk * (cfg.q * (zb + z_extra(cfg)) + (4 if cfg.master_fp32 else 0)
                      + (8 if cfg.optimizer == "adam" else 0))
    return Price(trainable=4 * nnz if cfg.master_fp32 else 0, optimizer=nnz * OPT_STATE_VALUES[cfg.optimizer]
                 * state_bytes, update=update, nnz=nnz)
