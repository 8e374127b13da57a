"""forward: nothing trained. One inference forward per step on the same batches: the reference every
suite adds, the floor a ZO step (two forwards) and its memory are measured against."""

from __future__ import annotations

from zobench.methods.base import Method, Price, register


@register
class Forward(Method):
    name = "forward"
    family = "reference"
    quantized = True  # inference runs on any weights
    summary = "nothing: inference only (the reference cell every suite adds)"
    order = 0
    color = "#7f7f7f"

    def build_stepper(self, run):
        from zobench.zo.trainer import ForwardOnly

        return ForwardOnly(run.model, run.loss_fn), None

    def price(self, inputs) -> Price:
        return Price()
