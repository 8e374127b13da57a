"""Dev-based selection (MeZO reports the best dev checkpoint): the best dev score so far, its step, and the
trained values at that step where they are cheap to keep."""

from __future__ import annotations

import shutil
import tempfile


class DevSelection:
    """The best dev score so far, its step, and the trained values at that step where they are cheap to
    keep: a sparse method's few values in memory; a dense run's weights on disk when they train on a CPU.

    On a CPU a dense run's replay (``Pipeline.rebuild``) costs about the draws of its training: 800 steps of
    full ZO on SmolLM2-135M took 34 minutes, against 0.1 s to write its 513 MiB at each new best and 0.08 s
    to read them back (``bench/best_weights.py``).
    The file is anonymous (unlinked at creation), so the space comes back when the process ends, even when
    it is killed. On a GPU the replay's draws are fast and a 7B model's weights are gigabytes: it replays.
    So does a run whose disk has less than twice the weights free (``best_weights`` in the record says which).
    A learning-rate pilot (``to_disk`` false: it never tests) writes nothing.
    """

    def __init__(self, trainable, to_disk: bool = True):
        self.trainable, self.best_step, self.best_score, self.values = trainable, None, None, None
        self.to_disk = to_disk
        self.file = None  # the dense weights at best_step, when kept on disk

    def see(self, step: int, scores: dict) -> None:
        score = scores.get("accuracy", scores.get("f1"))
        if score is None or (self.best_score is not None and score <= self.best_score[1]):
            return
        self.best_step, self.best_score = step, (scores, score)
        if self.trainable is None:  # a method that trains nothing, or trains by backprop: the score only
            return
        if self.trainable.snapshots:
            self.values = self.trainable.snapshot()
        elif self.to_disk and self.trainable.saves_raw and self._disk_fits():
            if self.file is None:
                self.file = tempfile.TemporaryFile(prefix="zobench-best-")
            self.trainable.save_raw(self.file)

    def _disk_fits(self) -> bool:
        if self.trainable.params[0].device.type != "cpu":
            return False
        return shutil.disk_usage(tempfile.gettempdir()).free >= 2 * self.trainable.nbytes

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    @property
    def best(self):
        return self.best_score[0] if self.best_score else None
