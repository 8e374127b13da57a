"""forward: nothing trained. One inference forward per step on the same batches: the reference every
suite adds, the floor a ZO step (two forwards) and its memory are measured against."""

from __future__ import annotations

from zobench.methods.base import Method, Price, register
from zobench.zo.trainer import ForwardOnly


@register
class Forward(Method):
    name = "forward"

    def build_stepper(self, run):
        return ForwardOnly(run.model, run.loss_fn), None

    def price(self, inputs) -> Price:
        return Price()
