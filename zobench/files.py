"""Reading user files and writing outputs so that a bad file or a full disk costs one line, never a torn file.

Reads (suites, results, records) turn every way a file can be unusable (missing, a directory, not
readable, not UTF-8) into a ``UserError`` naming the file. Writes come in two shapes:

* ``atomic_write``: the bytes go to a temporary file beside the target, are flushed to disk, then renamed
  over it. A failure (ENOSPC, EDQUOT, EFBIG, EIO, ...) removes the temporary file and leaves the old
  target as it was.
* ``append_line``: one line appended to a file on an ``O_APPEND`` descriptor. ``os.write`` may write
  fewer bytes than asked (a filesystem close to full does exactly that), so the rest is written in a
  loop; if any write fails the file is truncated back to its size before the append, so a reader never
  sees a fragment.

Both raise ``OutputError`` (a ``UserError``: one line, exit 2) naming the path and the reason.
``check_output_dir`` is called before long work starts, so an unwritable location is found before a
measurement that could not be saved is taken.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from zobench.errors import OutputError, UserError


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``, or a one-line ``UserError`` saying why it cannot be read."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a {what}") from None
    except PermissionError:
        raise UserError(f"{path}: {what} is not readable (permission denied)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start})") from None


def _reason(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if e.errno == errno.EFBIG:
        return "file too large for this filesystem or process limit"
    return e.strerror or str(e)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # a write of zero bytes would loop forever: the device takes nothing more
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def atomic_write(path: str | Path, data: bytes | str, what: str = "output") -> Path:
    """Write ``data`` to ``path`` all at once or not at all (see the module docstring)."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    check_output_dir(path.parent, what)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"{path}: cannot write the {what}: {_reason(e)}") from None
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"{path}: cannot write the {what}: {_reason(e)}; nothing was written") from None
    except BaseException:
        _remove(tmp)
        raise
    return path


def append_line(path: str | Path, line: bytes, what: str = "results file") -> None:
    """Append ``line`` (ending in a newline) to ``path`` whole, or leave the file as it was.

    Appends hold an exclusive ``flock``, so concurrent writers never interleave. A torn last line (no
    newline at the end: a writer killed mid-append by an older zobench or another tool) can never be
    completed; it is cut off, with a warning, before the new line goes in.
    """
    import fcntl
    import sys

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"{path}: cannot open the {what} for writing: {_reason(e)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        whole = _whole_lines_size(fd, size)
        try:
            if whole != size:
                os.ftruncate(fd, whole)
                print(f"zobench: warning: {path}: removed a torn last line ({size - whole} bytes, an "
                      f"interrupted append)", file=sys.stderr)
                size = whole
            _write_all(fd, line)
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)  # no fragment: the file is exactly what it was before
                os.fsync(fd)
            except OSError:
                pass
            raise OutputError(f"{path}: cannot append to the {what}: {_reason(e)}; the record was not "
                              f"written and the file is unchanged") from None
    finally:
        os.close(fd)


def _whole_lines_size(fd: int, size: int) -> int:
    """The size of the file up to and including its last newline (``size`` when it ends in one)."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        block = os.pread(fd, pos - start, start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        pos = start
    return 0


def _remove(path: str | Path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def check_output_dir(path: str | Path, what: str = "output") -> Path:
    """Make sure ``path`` is (or can be made) a directory this process can create files in.

    Creates it if missing. Probes by creating and removing a file: permission bits alone do not say
    (root ignores them; a read-only mount or a full quota does not show in them).
    """
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{path}: cannot be the {what} directory: {parent} is a file")
        if parent.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot create the {what} directory: {_reason(e)}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".zobench-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{path}: the {what} directory is not writable: {_reason(e)}") from None
    return path


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """``path`` can be written (its directory is writable) and, if it exists, is a writable regular file."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise OutputError(f"{path}: cannot be the {what}: it exists and is not a regular file")
    check_output_dir(path.parent, what)
    if path.exists():
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise OutputError(f"{path}: the {what} is not writable: {_reason(e)}") from None
    return path


def cache_dir() -> Path:
    """Where converted models, masks and built kernels live (``$ZOBENCH_CACHE``, else ``~/.cache/zobench``)."""
    root = os.environ.get("ZOBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zobench")
    return Path(root)


@contextlib.contextmanager
def build_lock(target: str | Path):
    """Hold an exclusive lock while the cache entry ``<cache>/<kind>/<name>`` is checked and, if missing, built.

    Cells running at once on one node (``--jobs``, Ray) that need the same mask or GPTQ layers would
    otherwise both build it: the second waits here, then finds the first one's entry. The lock file is
    ``<cache>/locks/<kind>-<name>.lock`` (a kind's folder holds entries only). The lock dies with its
    process (``flock``), so a killed builder never blocks the next. Where no lock file can be made (a
    read-only cache) the build goes ahead unlocked, as it would without a cache.
    """
    import fcntl

    target = Path(target)
    path = target.parent.parent / "locks" / f"{target.parent.name}-{target.name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
