"""Per-example predictions of every evaluation of a cell, kept beside its record.

    <results>/<suite>.predictions/<cell id>.npz      (a suite cell)
    <out>/predictions.npz                            (zobench train / eval)

One ``.npz`` (numpy's zip of arrays, read with ``allow_pickle=False``: data, never code) per cell; its
arrays are named ``<evaluation>.<field>``: the evaluation is ``test_before``, ``test_after``, ``test_best``
or ``dev_<step>``, the fields those of ``tasks.scoring.evaluate`` (``id``, ``gold``, ``pred``, ``scores`` for
classification; ``id``, ``pred``, ``em``, ``f1`` for generation). The record holds the file's path and
sha256 (``record.predictions``), so a verdict computed from it later can say it read the same bytes.

Why: accuracies alone allow no paired test (two methods right and wrong on the same examples), and no
re-analysis after the fact. The file is rewritten whole (atomically) at each dev checkpoint, so a cell
killed and resumed keeps the predictions of the evaluations it had made.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from zobench.errors import UserError
from zobench.files import atomic_write


class Predictions:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, np.ndarray]] = {}

    def add(self, name: str, details: dict) -> None:
        if details:
            self.entries[name] = {k: np.asarray(v) for k, v in details.items()}

    def resume(self, keep: set[str]) -> None:
        """Take back the evaluations named in ``keep`` from the file an earlier segment of this cell wrote
        (a checkpoint's dev evaluations); anything else there is from a run that did not get this far."""
        if self.path is None or not self.path.is_file():
            return
        for name, fields in read(self.path).items():
            if name in keep:
                self.entries[name] = fields

    def write(self) -> dict | None:
        """Write the file (whole, atomically); the record's description of it, or None with nothing kept."""
        if self.path is None or not self.entries:
            return None
        buf = io.BytesIO()
        np.savez(buf, **{f"{name}.{key}": value for name, fields in self.entries.items()
                         for key, value in fields.items()})
        data = buf.getvalue()
        atomic_write(self.path, data, "predictions file")
        return {"path": str(self.path), "sha256": hashlib.sha256(data).hexdigest(),
                "evaluations": sorted(self.entries)}


def read(path: str | Path, sha256: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """``{evaluation: {field: array}}`` of a predictions file; refused in one line when it is not one, or
    when ``sha256`` is given and the bytes are not the ones the record vouches for."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: predictions file not readable ({e.strerror or e})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{path}: not the predictions its record names (sha256 differs)")
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                name, _, field = key.rpartition(".")
                out.setdefault(name, {})[field] = npz[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a predictions file ({str(e).splitlines()[0][:200]})") from None
    return out
