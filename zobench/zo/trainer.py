"""The ZO training loop: SPSA with the seed trick, on a dense or sparse trainable set.

One step (q = 1):  w + eps z -> L+ ;  w - eps z -> L- ;  g = (L+ - L-) / (2 eps) ;  w <- opt(w, g z),
where z is regenerated from the step's seed at every pass instead of being stored. With q > 1 the
estimate averages q independent (seed, g) pairs taken at the same w. With ``clip`` (QZO's directional
derivative clipping), g is clipped to [-clip, clip] before it is used or recorded: one step then moves each
value by at most lr * clip * |z| (SGD), whatever a noisy low-precision forward returned.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch

from zobench.zo.trainable import Trainable

PHASES = ("perturb", "forward_plus", "forward_minus", "update")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepResult:
    loss: float                      # (L+ + L-) / 2, the loss at w estimated without a third forward
    # (seed, coefficient) of each direction as the update applied it (the projected gradient / q): with the
    # step index and the optimizer settings, all that is needed to replay the step (``replay``)
    directions: list[tuple[int, float]]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


class Stepper:
    """What a method's stepper is to the cell: ``step(batch, i)`` runs one step on ``model``, ``flush()``
    applies anything pending, and what it can do is declared here, not probed."""

    model: torch.nn.Module | None = None
    numel: int | None = None  # values it trains itself (a first-order trainer; ZO's are its trainable's)
    # A checkpoint brings it back: its state between steps is its trainable's values and the direction
    # seeds drawn so far from ``rng``, both rebuilt from the trajectory (``cell.pipeline``).
    resumable: ClassVar[bool] = False

    def flush(self) -> None:
        raise NotImplementedError

    def step(self, batch, step: int) -> StepResult:
        raise NotImplementedError


class ZOTrainer(Stepper):
    """Runs ZO steps; ``loss_fn(model, batch) -> scalar tensor`` is called under inference mode.

    With ``fold`` (ZO2's trick, the default), a step's restore and update are not a pass of their own: they
    stay pending and run inside the next step's +eps pass (``Trainable.fold_step``: one pass over the
    weights where the kernel fuses it), so a step makes two passes over the weights instead of three. The
    result is bit for bit the unfolded one (each value sees the same operations in the same order). Anything
    that looks at the weights between steps (dev and test evaluation, a checkpoint, a best-step snapshot, a
    save) calls ``flush()`` first, which applies the pending update.
    """

    resumable = True

    def __init__(self, model: torch.nn.Module, trainable: Trainable, optimizer, loss_fn: Callable,
                 eps: float = 1e-3, q: int = 1, seed: int = 0, fold: bool = True, clip: float | None = None):
        self.model, self.trainable, self.optimizer, self.loss_fn = model, trainable, optimizer, loss_fn
        self.eps, self.q, self.clip = eps, max(1, int(q)), clip
        self.rng = random.Random(seed)
        self.device = next(model.parameters()).device
        self.fold = fold
        self.pending: tuple[list, int] | None = None  # (directions, step) of an update not yet applied

    def flush(self) -> None:
        """Apply the pending update, if any: the weights are then the trained ones of the last step."""
        if self.pending is not None:
            grads, step = self.pending
            self.pending = None
            self.trainable.update(grads, self.optimizer, step)

    def _perturb(self, seed: int) -> None:
        """The step's first pass: +eps along z(seed), with the previous step's update folded in."""
        if self.pending is not None:
            grads, step = self.pending
            self.pending = None
            self.trainable.fold_step(grads, self.optimizer, step, seed, self.eps)
        else:
            self.trainable.apply(seed, self.eps)

    def _timed(self, seconds: dict, phase: str, fn):
        _sync(self.device)
        t = time.perf_counter()
        out = fn()
        _sync(self.device)
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t
        return out

    def _loss(self, batch) -> float:
        with torch.inference_mode():
            return float(self.loss_fn(self.model, batch))

    def step(self, batch, step: int) -> StepResult:
        sec: dict[str, float] = {}
        grads, losses = [], []
        if self.q > 1:  # q directions at the same weights: the previous update goes in first
            self._timed(sec, "update", self.flush)
        for _ in range(self.q):
            seed = self.rng.randrange(2**62)
            self._timed(sec, "perturb", lambda: self._perturb(seed))
            lp = self._timed(sec, "forward_plus", lambda: self._loss(batch))
            self._timed(sec, "perturb", lambda: self.trainable.apply(seed, -self.eps))
            lm = self._timed(sec, "forward_minus", lambda: self._loss(batch))
            g = (lp - lm) / (2 * self.eps)
            if self.clip is not None:
                g = min(max(g, -self.clip), self.clip)
            grads.append((seed, g / self.q))
            losses.append((lp + lm) / 2)
        if self.fold and self.q == 1:
            self.pending = (grads, step)  # runs inside the next step's first pass (or flush)
            sec.setdefault("update", 0.0)
        else:
            self._timed(sec, "update", lambda: self.trainable.update(grads, self.optimizer, step))
        return StepResult(sum(losses) / len(losses), grads, sec)


def train_steps(stepper, batches: Iterator, steps: Iterable[int],
                encode: Callable[[Any], Any] | None = None) -> Iterator[tuple[int, Any, StepResult]]:
    """The training loop of every method (a ZO trainer, a first-order one, the forward reference): for each
    step index, the next batch of ``batches`` (through ``encode``), one ``stepper.step``; yields ``(step,
    batch, result)`` so that the caller keeps its own books (timings, logs, evaluations, checkpoints). A ZO
    update may still be pending afterwards: call ``stepper.flush()`` before looking at the weights."""
    for i in steps:
        batch = next(batches) if encode is None else encode(next(batches))
        yield i, batch, stepper.step(batch, i)


@torch.no_grad()
def replay(trainable: Trainable, optimizer, trajectory: list, eps: float, steps: int, start: int = 0) -> None:
    """Redo steps ``start`` to ``steps`` of a ZO run on ``trainable`` (from its initial weights, or from
    where an earlier replay left it): the same perturbations (+eps, then -eps) and the same update, in the
    same order as ``ZOTrainer.step``, so the result is bit for bit the trained weights of that step without
    a single forward (MeZO's storage-efficient checkpoint: a run is its (seed, projected gradient) trajectory)."""
    for step, directions in enumerate(trajectory[start:steps], start):
        for seed, _ in directions:
            trainable.apply(int(seed), eps)
            trainable.apply(int(seed), -eps)
        trainable.update([(int(s), float(c)) for s, c in directions], optimizer, step)


class ForwardOnly(Stepper):
    """The reference cell: one inference forward per step on the same batches, nothing trained.

    A ZO step is bounded below by two of these; reports divide by it.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        self.model, self.loss_fn = model, loss_fn
        self.device = next(model.parameters()).device

    def flush(self) -> None:
        """Nothing is pending: nothing is trained."""

    def step(self, batch, step: int) -> StepResult:
        _sync(self.device)
        t = time.perf_counter()
        with torch.inference_mode():
            loss = float(self.loss_fn(self.model, batch))
        _sync(self.device)
        return StepResult(loss, [], {"forward": time.perf_counter() - t})
