"""full: MeZO. Every weight of the scope (all parameters by default) perturbed in place by eps * z, with
z regenerated from the step's seed instead of stored; the restore is folded into the update pass."""

from __future__ import annotations

from zobench.methods.base import Method, register
from zobench.methods.common import dense_price, zo_stepper
from zobench.zo.trainable import DenseTrainable


@register
class Full(Method):
    name = "full"

    def build_stepper(self, run):
        cfg = run.cfg
        return zo_stepper(run, DenseTrainable(run.params, cfg.direction, master=cfg.master_fp32,
                                              generator=cfg.generator))

    def price(self, inputs):
        return dense_price(inputs)
