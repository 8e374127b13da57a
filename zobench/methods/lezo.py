"""lezo: layer-wise sparse ZO (LeZO, Wang et al., arXiv 2410.09823).

MeZO perturbs and updates every weight each step, and on large models those passes are a large share of
a step. LeZO treats layers as the unit of sparsity: each step draws a random subset of the units and
perturbs and updates only those, so over many steps every weight is trained (full-parameter fine-tuning)
while each step pays for a fraction of the passes. Here a unit is one transformer block; the parameters
outside the blocks (embeddings, final norm, head) together form one more unit. ``layer_fraction`` is the
fraction of units drawn per step (at least one).

Each unit is a ``DenseTrainable`` with its own seed derived from the step's seed, so the z of different
units are independent; a unit not drawn gets neither perturbation nor update.
"""

from __future__ import annotations

import random
import re

from zobench.methods.base import Method, register
from zobench.methods.common import dense_price, zo_stepper
from zobench.zo.trainable import DenseTrainable, Trainable

BLOCK = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.\d+)\.")


def units(params: list[tuple[str, object]]) -> list[list[tuple[str, object]]]:
    """The scope's parameters grouped by transformer block, plus one unit of everything else."""
    blocks: dict[str, list] = {}
    rest = []
    for name, p in params:
        m = BLOCK.match(name)
        (blocks.setdefault(m.group(1), []) if m else rest).append((name, p))
    return list(blocks.values()) + ([rest] if rest else [])


def unit_seed(seed: int, unit: int) -> int:
    return (seed * 1_000_003 + unit * 7_919 + 1) % (1 << 62)


class LayerSubset(Trainable):
    """A trainable over ``units``, each step touching ``k`` of them, drawn from the step's seed."""

    saves_raw = True  # every unit's weights, one after the other

    def __init__(self, parts: list, k: int):
        super().__init__()
        self.parts, self.k = parts, k
        self.direction = parts[0].direction
        self.numel = sum(t.numel for t in parts)
        self.params = [p for t in parts for p in t.params]

    def drawn(self, seed: int) -> list[int]:
        return sorted(random.Random(seed).sample(range(len(self.parts)), self.k))

    def apply(self, seed: int, scale: float) -> None:
        drawn = self.drawn(seed)
        for u, t in enumerate(self.parts):
            if u in drawn:
                t.apply(unit_seed(seed, u), scale)
            else:
                t.restore()  # drawn for an earlier direction of this step (q > 1): back to its base

    def restore(self) -> None:
        for t in self.parts:
            t.restore()

    def update(self, grads: list[tuple[int, float]], optimizer, step: int) -> None:
        for u, t in enumerate(self.parts):
            mine = [(unit_seed(seed, u), coef) for seed, coef in grads if u in self.drawn(seed)]
            if mine:
                t.update(mine, optimizer, step)
            else:
                t.restore()

    def fold_step(self, grads: list[tuple[int, float]], optimizer, step: int, seed: int, scale: float) -> None:
        """``update(grads, ...)`` then ``apply(seed, scale)``, each unit in one pass where it takes part in
        both (the units are disjoint tensors, so doing them unit by unit changes no value)."""
        drawn = self.drawn(seed)
        for u, t in enumerate(self.parts):
            mine = [(unit_seed(s, u), coef) for s, coef in grads if u in self.drawn(s)]
            if mine and u in drawn:
                t.fold_step(mine, optimizer, step, unit_seed(seed, u), scale)
            elif mine:
                t.update(mine, optimizer, step)
            elif u in drawn:
                t.restore()
                t.apply(unit_seed(seed, u), scale)
            else:
                t.restore()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts)

    def save_raw(self, f) -> None:
        f.seek(0)
        for t in self.parts:
            t.save_raw(f, rewind=False)

    def load_raw(self, f) -> None:
        f.seek(0)
        for t in self.parts:
            t.load_raw(f, rewind=False)


@register
class LeZO(Method):
    name = "lezo"

    def build_stepper(self, run):
        cfg = run.cfg
        groups = units(run.params)
        parts = [DenseTrainable(g, cfg.direction, master=cfg.master_fp32, tag=f"unit{u}",
                                generator=cfg.generator) for u, g in enumerate(groups)]
        k = max(1, round(cfg.layer_fraction * len(parts)))
        return zo_stepper(run, LayerSubset(parts, k))

    def price(self, inputs):
        # The same passes as full ZO, over fewer tensors per step; the largest z chunk and the optimizer
        # state (over every unit, in time) are the same.
        return dense_price(inputs)
