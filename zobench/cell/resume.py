"""A cell's checkpoint written from, and taken back into, its pipeline (``cell.pipeline.Pipeline``, passed as
``cell``): what is saved after a dev evaluation, and how a resumed cell replays its way back to that step.
The file format is ``cell.checkpoint``'s."""

from __future__ import annotations

import time

from zobench.cell import checkpoint
from zobench.measure.env import this_machine
from zobench.measure.load import own_cpu_s
from zobench.spec.matrix import cell_id, identity
from zobench.zo.trainer import replay


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds now; a cell notes them when it begins, for what its checkpoints say it spent."""
    return time.perf_counter(), own_cpu_s()


def spent_so_far(cell) -> dict:
    """Wall and CPU seconds the cell has spent up to now, its earlier segments' (up to their last checkpoint)
    included."""
    wall, cpu = clock()
    before = cell.resumed.spent if cell.resumed is not None else {}
    return {"wall_s": round(before.get("wall_s", 0) + wall - cell.began[0], 3),
            "cpu_s": round(before.get("cpu_s", 0) + cpu - cell.began[1], 3)}


def save_checkpoint(cell, step: int, timing, reference) -> None:
    """Write the cell's checkpoint at ``step`` (``cell.checkpoint``): its books so far and the predictions
    (first, so that the checkpoint can name the bytes a resumed segment is to take back)."""
    sel = cell.selection
    kept = cell.predictions.write()  # the evaluations so far, for a resumed segment to take back
    checkpoint.save(cell.cfg.checkpoint, checkpoint.Checkpoint(
        cell_id=cell_id(cell.cfg), config=identity(cell.cfg), step=step, losses=timing.losses,
        trajectory=timing.trajectory, seconds=timing.seconds, parts=timing.parts, tokens=timing.tokens,
        total=timing.total, reference_seconds=reference.seconds if reference is not None else [],
        dev_curve=cell.metrics.get("dev_curve") or [], best_step=sel.best_step,
        best_scores=sel.best, test_before=cell.metrics.get("test_before"),
        segments=cell.resumed.segments if cell.resumed else 1, spent=spent_so_far(cell),
        predictions_sha256=kept["sha256"] if kept else None,
        machines=(list(cell.resumed.machines) if cell.resumed else []) + [this_machine()]))


def restore(cell, stepper, trainable, timing, reference, stream) -> int:
    """Bring the run to the checkpoint's step: its records so far, the batches and direction seeds
    drawn so far, and the trained values by replaying the trajectory (the best dev step's values
    kept on the way). Returns the step to go on from."""

    ck, cfg = cell.resumed, cell.cfg
    if trainable is None or not stepper.resumable or ck.step >= cfg.steps:
        cell.record.add_warning(f"checkpoint at step {ck.step} does not fit this cell; it ran from step 0")
        cell.resumed = None
        return 0
    timing.losses, timing.trajectory, timing.total = list(ck.losses), list(ck.trajectory), ck.total
    timing.seconds, timing.parts, timing.tokens = list(ck.seconds), dict(ck.parts), list(ck.tokens)
    if reference is not None:  # a reference forward followed every ref_every-th timed step: the pairs again
        reference.seconds = list(ck.reference_seconds)
        paired = zip(timing.seconds[cfg.ref_every - 1::cfg.ref_every], reference.seconds)
        reference.ratios = [step_s / (2 * fwd) for step_s, fwd in paired]
    cell.metrics.set(dev_curve=list(ck.dev_curve))
    if not cell.predictions.resume({f"dev_{p['step']}" for p in ck.dev_curve} |
                                   ({"test_before"} if ck.test_before is not None else set()), ck.predictions_sha256):
        cell.record.add_warning("the predictions file beside the checkpoint is not the one it names: the "
                                "earlier segments' evaluations keep their scores but not their per-example "
                                "predictions")
    for _ in range(ck.step):
        next(stream)
    for step, directions in enumerate(ck.trajectory):
        drawn = [stepper.rng.randrange(2**62) for _ in directions]
        if drawn != [int(seed) for seed, _ in directions]:
            raise RuntimeError(f"checkpoint {cfg.checkpoint}: step {step + 1} drew other direction seeds "
                               f"than recorded; delete it to run the cell from step 0")
    if ck.best_step is not None:  # replayed in two parts, to keep the best step's values on the way
        replay(trainable, stepper.optimizer, ck.trajectory, cfg.eps, ck.best_step)
        cell.selection.see(ck.best_step, ck.best_scores)
    replay(trainable, stepper.optimizer, ck.trajectory, cfg.eps, ck.step, start=ck.best_step or 0)
    ck.segments += 1
    cell.metrics.set(resumed_from_step=ck.step, segments=ck.segments)
    if ck.spent:  # what the earlier segments cost (CellRecord.cpu_s, CellRecord.machine_s)
        cell.metrics.set(earlier_segments=dict(ck.spent))
    if ck.machines:  # where every segment ran, this one last: a report says when they differ
        cell.metrics.set(segment_machines=[*ck.machines, this_machine()])
    return ck.step
