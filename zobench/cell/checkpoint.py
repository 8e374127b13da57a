"""Mid-cell checkpoints: a long ZO cell killed part-way resumes where it stopped, not from step 0.

A ZO run is its trajectory, the (seed, projected gradient) of every step (MeZO's storage-efficient
checkpoint), so the trained state after k steps is the initial state plus a replay of k steps
(``zobench.zo.trainer.replay``, no forward). A checkpoint is therefore a small JSON file, not a copy of the
model: the cell's id and config, the step, the losses, trajectory and timings so far, the dev curve and
the best dev step, the test score before training, and the wall and CPU seconds every segment spent up
to it (so a resumed cell's cost counts its earlier segments; the work an earlier segment did after its last
checkpoint is lost and not counted). A suite cell writes one after every dev evaluation
(every 100 steps without ``eval_every``), atomically; ``zobench run --resume`` gives it back to the cell,
which replays it, checks that its direction seeds draw the same as recorded, and goes on. The result is bit
for bit the uninterrupted run's (tested); the record says ``resumed_from_step`` and its step timings come
from every segment (each segment's machine may differ: ``execution`` and ``env`` are the last one's; the
checkpoint names every segment's machine, and the record keeps them, its own last, as ``segment_machines``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zobench.cell.delta_check import check_trajectory, whole_number
from zobench.cell.predictions import SHA256
from zobench.errors import UserError
from zobench.files import MAX_ARTIFACT_BYTES, atomic_write, read_json
from zobench.spec.config import LIMITS

EVERY_WITHOUT_EVAL = 100  # steps between checkpoints of a cell that evaluates no dev set


@dataclass
class Checkpoint:
    cell_id: str
    config: dict                                # what the id hashes (spec.matrix.identity), for a reader
    step: int                                   # steps done
    losses: list = field(default_factory=list)
    trajectory: list = field(default_factory=list)
    seconds: list = field(default_factory=list)  # the timed steps' (warm-up excluded)
    parts: dict = field(default_factory=dict)
    tokens: list = field(default_factory=list)
    total: float = 0.0                           # training seconds so far, warm-up included
    reference_seconds: list = field(default_factory=list)
    dev_curve: list = field(default_factory=list)
    best_step: int | None = None
    best_scores: dict | None = None
    test_before: dict | None = None
    segments: int = 1                            # processes the steps so far ran in
    spent: dict = field(default_factory=dict)    # {wall_s, cpu_s} of every segment up to this checkpoint
    predictions_sha256: str | None = None        # the predictions file written just before it
    machines: list = field(default_factory=list)  # each segment's machine so far (measure.machine.machine_name)


def due(step: int, steps: int, eval_every: int) -> bool:
    """Whether a checkpoint is written after ``step`` steps (never after the last: the record follows)."""
    return step < steps and step % (eval_every or EVERY_WITHOUT_EVAL) == 0


def save(path: str | Path, ckpt: Checkpoint) -> None:
    """Write atomically (``files.atomic_write``: a kill while writing leaves the previous checkpoint whole,
    and nothing is written through a symbolic link planted where the file or its temporary goes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(asdict(ckpt)), "checkpoint")


def check_spent(spent) -> None:
    """``spent`` is {} (a checkpoint from before it was kept) or {wall_s, cpu_s}, each a number >= 0."""
    if not isinstance(spent, dict) or (spent and set(spent) != {"wall_s", "cpu_s"}):
        raise ValueError("spent: expected {wall_s, cpu_s}")
    for key, value in spent.items():
        if type(value) not in (int, float) or not 0 <= value < float("inf"):
            raise ValueError(f"spent.{key} = {value!r}: expected a number of seconds")


def _numbers(values, where: str, whole: bool = False) -> None:
    """``values``: a list of finite numbers >= 0 (whole numbers with ``whole``)."""
    if not isinstance(values, list):
        raise ValueError(f"{where}: expected a list")
    for v in values:
        if type(v) not in ((int,) if whole else (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"{where}: {v!r:.40} is not a {'whole ' if whole else ''}number >= 0")


def _scores(scores, where: str) -> None:
    """``scores``: None or a mapping of score names to finite numbers (an evaluation's, ``cell.selection``)."""
    if scores is None:
        return
    if not isinstance(scores, dict) or not all(isinstance(k, str) for k in scores):
        raise ValueError(f"{where}: expected a mapping of score names to numbers")
    _numbers(list(scores.values()), where)


def check_books(ckpt: Checkpoint) -> None:
    """The books a resumed cell takes back as they are (``cell.resume.restore``): each of the shape it
    writes, so that a damaged or crafted file is refused here, in one line, not in the middle of a cell."""
    if not isinstance(ckpt.config, dict):
        raise ValueError("config: expected a mapping")
    if not isinstance(ckpt.losses, list) or len(ckpt.losses) > ckpt.step or not all(
            type(v) in (int, float) and math.isfinite(v) for v in ckpt.losses):
        raise ValueError("losses: expected at most one finite number a step")
    for name in ("seconds", "reference_seconds"):
        _numbers(getattr(ckpt, name), name)
    _numbers(ckpt.tokens, "tokens", whole=True)
    if not isinstance(ckpt.parts, dict) or not all(isinstance(k, str) for k in ckpt.parts):
        raise ValueError("parts: expected a mapping of step parts to lists of seconds")
    for part, values in ckpt.parts.items():
        _numbers(values, f"parts.{part}")
    _numbers([ckpt.total], "total")
    whole_number(ckpt.segments, "segments", 1, 10**6)
    if not isinstance(ckpt.machines, list) or len(ckpt.machines) > ckpt.segments or not all(
            isinstance(m, str) and 0 < len(m) <= 160 and m.isprintable() for m in ckpt.machines):
        raise ValueError("machines: expected at most one short machine name a segment")
    if ckpt.best_step is not None:
        whole_number(ckpt.best_step, "best_step", 0, ckpt.step)
    _scores(ckpt.best_scores, "best_scores")
    _scores(ckpt.test_before, "test_before")
    if not isinstance(ckpt.dev_curve, list):
        raise ValueError("dev_curve: expected a list")
    for point in ckpt.dev_curve:
        if not isinstance(point, dict):
            raise ValueError("dev_curve: expected a list of evaluations")
        whole_number(point.get("step"), "dev_curve step", 0, ckpt.step)
        _scores({k: v for k, v in point.items() if k != "step"}, "dev_curve")


def load(path: str | Path, cell_id: str) -> tuple[Checkpoint | None, str | None]:
    """The checkpoint at ``path`` if it belongs to this cell, else (None, why not) for the record's
    warnings; (None, None) where there is none."""
    path = Path(path)
    if not path.exists():
        return None, None
    try:
        ckpt = Checkpoint(**read_json(path, "checkpoint", MAX_ARTIFACT_BYTES))
        whole_number(ckpt.step, "step", 0, LIMITS["steps"])
        check_trajectory(ckpt.trajectory, ckpt.step, f"{path}: trajectory")
        check_spent(ckpt.spent)
        check_books(ckpt)
        sha = ckpt.predictions_sha256
        if sha is not None and not (isinstance(sha, str) and SHA256.fullmatch(sha)):
            raise ValueError("predictions_sha256: expected 64 hex digits")
    except (UserError, ValueError, TypeError) as e:
        return None, f"checkpoint {path} unreadable ({str(e)[:200]}); the cell ran from step 0"
    if ckpt.cell_id != cell_id:
        return None, f"checkpoint {path} is cell {ckpt.cell_id}'s, not {cell_id}'s; the cell ran from step 0"
    return ckpt, None
