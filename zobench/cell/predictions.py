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
import re
import zipfile
from pathlib import Path

import numpy as np

from zobench.errors import UserError
from zobench.files import atomic_write, refuse_special

# A cell's file holds a few arrays of one value per test or dev example (SST-2's 872: ~50 KiB); these bound
# what reading a hostile one costs (a tiny deflated member can claim gigabytes).
MAX_FILE_BYTES = 64 << 20
MAX_MEMBER_BYTES = 256 << 20  # uncompressed, each array
MAX_MEMBERS = 4096
SHA256 = re.compile(r"[0-9a-f]{64}")  # how a record (and a checkpoint) names a predictions file's bytes


class Predictions:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, np.ndarray]] = {}

    def add(self, name: str, details: dict) -> None:
        if details:
            self.entries[name] = {k: np.asarray(v) for k, v in details.items()}

    def resume(self, keep: set[str], sha256: str | None = None) -> bool:
        """Take back the evaluations named in ``keep`` from the file an earlier segment of this cell wrote
        (a checkpoint's dev evaluations); anything else there is from a run that did not get this far. With
        ``sha256`` (the checkpoint's), only those bytes: False, and nothing taken, when the file is not them
        (or is missing, or not a predictions file), since the new record's hash will vouch for it."""
        if self.path is None or (not self.path.is_file() and sha256 is None):
            return True
        try:
            found = read(self.path, sha256)
        except UserError:
            if sha256 is None:
                raise
            return False
        for name, fields in found.items():
            if name in keep:
                self.entries[name] = fields
        return True

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
    refuse_special(path, "predictions file")
    try:
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes, more than a predictions file holds "
                            f"({MAX_FILE_BYTES:,})")
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: predictions file not readable ({e.strerror or e})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{path}: not the predictions its record names (sha256 differs)")
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [m for m in z.infolist() if m.filename.endswith(".npy")]
            if len(members) > MAX_MEMBERS:
                raise ValueError(f"{len(members)} arrays")
            for m in members:
                name, _, field = m.filename.removesuffix(".npy").rpartition(".")
                out.setdefault(name, {})[field] = _array(z, m)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a predictions file ({str(e).splitlines()[0][:200]})") from None
    return out


def _array(z: zipfile.ZipFile, member: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` member, its header read first: an array whose declared size (shape x item size) or
    unpacked size is over the bound is refused before anything is allocated; object arrays are refused."""
    with z.open(member) as f:
        fmt = np.lib.format
        version = fmt.read_magic(f)  # zobench writes 1.0; 2.0 only widens the header's length field
        header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if header is None:
            raise ValueError(f"'{member.filename}' is in .npy format {version}")
        shape, _, dtype = header(f)
        if dtype.hasobject:
            raise ValueError(f"'{member.filename}' holds Python objects")
        size = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if size > MAX_MEMBER_BYTES or member.file_size > MAX_MEMBER_BYTES + 4096:
            raise ValueError(f"'{member.filename}' declares {max(size, member.file_size):,} bytes")
    with z.open(member) as f:
        return np.lib.format.read_array(f, allow_pickle=False)
