"""The on-disk cache of per-example sketches: one directory per (model, dataset, sketch config).

    meta.json   what the sketches were computed from (model, dataset hash, sketch config, ...), n and k
    sketch.f16  float16 [n, k] raw memmap, row i = sketch of training example i
    done.u8     uint8 [n] raw memmap, 1 once row i is on disk

Why this shape: the cache is the expensive part of influence (one backward pass per example), so a killed
run must resume where it stopped, and several processes (one per GPU) must fill disjoint rows of the
same cache at once. Each row is written and flushed before its done flag is set and flushed, so a done
flag never points at a row that is not on disk. Every process maps the files itself (MAP_SHARED), so
their writes meet in the page cache with no coordination beyond disjoint rows.

A new cache is built in a private sibling directory and renamed into place in one step, so no reader
ever sees data files without their meta.json, and of two processes creating the same cache one wins and
the other opens the winner's (after checking that its meta matches).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from zobench.errors import OutputError, UserError
from zobench.files import read_json
from zobench.outdirs import refuse_unsafe_target

FORMAT = 1
META, SKETCH, DONE = "meta.json", "sketch.f16", "done.u8"


def dataset_hash(rows: list[dict]) -> str:
    """First 16 hex chars of the sha256 of a canonical JSON of the examples (key order does not matter)."""
    text = json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_MISSING = object()


def _show(value) -> str:
    return "missing" if value is _MISSING else json.dumps(value, sort_keys=True)


class SketchStore:
    """An open cache; build it with ``open_or_create`` (to write) or ``open`` (read-only)."""

    def __init__(self, path: Path, meta: dict, writable: bool):
        self.path = path
        self.meta = meta
        self.n, self.k = meta["n"], meta["k"]
        self.writable = writable
        mode = "r+" if writable else "r"
        for name, size in ((SKETCH, self.n * self.k * 2), (DONE, self.n)):
            actual = (path / name).stat().st_size if (path / name).is_file() else None
            if actual != size:
                found = "missing" if actual is None else f"{actual} bytes"
                raise UserError(f"{path / name}: {found}, but meta.json says n={self.n}, k={self.k} "
                                f"({size} bytes); delete this cache directory")
        self._sketch = np.memmap(path / SKETCH, dtype=np.float16, mode=mode, shape=(self.n, self.k))
        self._done = np.memmap(path / DONE, dtype=np.uint8, mode=mode, shape=(self.n,))
        self._matrix = None

    # -- opening -------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> "SketchStore":
        """Read-only view of an existing cache."""
        path = Path(path)
        meta = _read_meta(path)
        if meta is None:
            raise UserError(f"{path}: not a sketch cache (no {META}); build it with `zobench influence cache`")
        return cls(path, meta, writable=False)

    @classmethod
    def open_or_create(cls, path: str | Path, meta: dict, n: int, k: int) -> "SketchStore":
        """Opens the cache at ``path`` for writing if its meta matches ``meta`` (plus n and k), else creates it."""
        path = Path(path)
        if n < 1 or k < 1:
            raise UserError(f"{path}: a sketch cache needs n >= 1 examples and k >= 1 bins, got n={n}, k={k}")
        # Round-trip through JSON so tuples compare equal to the lists read back from disk.
        want = json.loads(json.dumps({**meta, "n": n, "k": k, "format": FORMAT}, default=str))
        stored = _read_meta(path)
        if stored is None:
            stored = _create(path, want)
        for key, value in want.items():
            have = stored.get(key, _MISSING)
            if have != value:
                raise UserError(f"{path / META}: key '{key}' is {_show(have)} here, this run asks for "
                                f"{_show(value)}; use another cache directory or delete this one")
        return cls(path, stored, writable=True)

    # -- state ---------------------------------------------------------------------------------------

    def missing(self) -> np.ndarray:
        """Row indices not yet on disk (as other processes see them too: the flags are a shared mapping)."""
        return np.flatnonzero(self._done == 0)

    @property
    def complete(self) -> bool:
        return bool(self._done.all())

    # -- writing and reading -------------------------------------------------------------------------

    def write(self, rows, values) -> None:
        """Stores values [len(rows), k] as float16 at ``rows``, then marks those rows done."""
        if not self.writable:
            raise ValueError(f"{self.path}: opened read-only; use SketchStore.open_or_create to write")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if hasattr(values, "detach"):  # a torch tensor, on any device
            values = values.detach().to("cpu").float().numpy()
        values = np.asarray(values)
        if values.shape != (rows.size, self.k):
            raise ValueError(f"{self.path}: values of shape {values.shape} for {rows.size} rows of k={self.k}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise ValueError(f"{self.path}: row indices must be in [0, {self.n})")
        self._sketch[rows] = values.astype(np.float16)
        # The order is the point: rows reach the disk before any flag that vouches for them.
        self._sketch.flush()
        self._done[rows] = 1
        self._done.flush()

    def matrix(self) -> np.memmap:
        """The whole [n, k] float16 matrix as a read-only memmap (rows not done are zeros)."""
        if self._matrix is None:
            self._matrix = np.memmap(self.path / SKETCH, dtype=np.float16, mode="r", shape=(self.n, self.k))
        return self._matrix

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows start .. stop - 1, a read-only view: retrieval streams blocks instead of loading n x k."""
        return self.matrix()[start:stop]


def _read_meta(path: Path) -> dict | None:
    """The stored meta, or None for a directory that holds no cache yet; UserError for a broken one."""
    meta_file = path / META
    # Data first, then meta: a cache appears by one atomic rename, so data seen before meta is looked
    # for means the meta is there too (the other order raced a concurrent creator).
    has_data = (path / SKETCH).exists() or (path / DONE).exists()
    if not meta_file.is_file():
        if has_data:
            raise UserError(f"{path}: holds sketch data but no {META}; delete this directory or use another")
        return None
    try:
        meta = read_json(meta_file, "sketch cache meta")
    except UserError as e:
        why = str(e).split(": ", 1)[-1]
        raise UserError(f"{meta_file}: unreadable ({why}); delete this cache directory") from None
    if isinstance(meta, dict):  # caches written before the names were aligned with the rest of zobench
        if "seed" in meta and "sketch_seed" not in meta:
            meta["sketch_seed"] = meta.pop("seed")
        if meta.get("scope") == "full":
            meta["scope"] = "all"
    if not isinstance(meta, dict) or not _whole(meta.get("n")) or not _whole(meta.get("k")):
        raise UserError(f"{meta_file}: not a sketch cache meta (needs integer 'n' and 'k'); delete this directory")
    return meta


def _whole(value) -> bool:
    """A count a cache can have: a positive int below 2**40 (a hostile meta could claim terabytes)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**40


def _allocate(file: Path, size: int, cache: Path) -> None:
    """A zero-filled file of ``size`` bytes whose blocks are reserved on the disk now.

    Rows are written through a memory map, and a write into a mapped page the filesystem cannot back
    kills the process with SIGBUS: no message, no cleanup. Reserving the blocks up front turns a disk too
    small for the cache into one clear error before any work is done. Filesystems without fallocate get
    a sparse file (the old behaviour).
    """
    full = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    with open(file, "wb") as f:
        try:
            if size:
                os.posix_fallocate(f.fileno(), 0, size)  # reserves the blocks and sets the size
            f.truncate(size)  # the size, where the filesystem cannot reserve (a sparse file)
        except OSError as e:
            if e.errno in full:
                raise OutputError(f"{cache}: the cache needs {size / 2**30:.2f} GiB for {file.name} and the "
                                  f"disk cannot hold it ({e.strerror}); nothing was created") from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            f.truncate(size)


def _create(path: Path, meta: dict) -> dict:
    """Builds the cache in a private sibling and renames it to ``path``; returns the meta now at ``path``."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path}: exists and is not a sketch cache; point to a new or empty directory")
    refuse_unsafe_target(path, "sketch cache")
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = path.parent / f".{path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        for name, size in ((SKETCH, meta["n"] * meta["k"] * 2), (DONE, meta["n"])):
            _allocate(stage / name, size, path)
        tmp = stage / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, stage / META)
        try:
            os.rename(stage, path)  # atomic; replaces an empty directory, fails on a non-empty one
        except OSError:
            stored = _read_meta(path)  # another process created it first: use theirs if it matches
            if stored is None:
                raise
            return stored
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return meta
