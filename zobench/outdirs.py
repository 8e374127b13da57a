"""Where zobench writes, and the rule that keeps what the user owns: nothing is deleted or overwritten unless
it is provably zobench's own (docs/security.md).

* ``check_output_dir`` / ``check_output_file``: a location is writable before long work starts, so a
  measurement that could not be saved is never taken. A file that is a symbolic link is refused: zobench
  never writes through a link to a place the user did not name.
* ``claim_dir``: a directory zobench will *replace* (a delta from ``--save``, an influence cache) is
  refused outright when it is ``/``, the home directory, the working directory or one of its parents; an
  existing non-empty directory is taken only when it is a complete artifact of the same kind (its
  ``is_ours`` check), and then only with an explicit overwrite.
* ``replace_dir``: the new directory is built whole beside the target first, then swapped in atomically
  (renameat2); the old one is removed only after. A crash at any point leaves the whole old or the whole
  new artifact in place.
* ``output_lock``: one writer per results file. A second run appending to the same file is refused in one
  line instead of recording every cell twice.
* ``build_lock``: cache entries (masks, GPTQ layers) built by one process while the others wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from zobench.errors import OutputError, UserError


def reason(e: OSError) -> str:
    """An OSError as the few words a user can act on."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if e.errno == errno.EFBIG:
        return "file too large for this filesystem or process limit"
    return e.strerror or str(e)


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
        raise OutputError(f"{path}: cannot create the {what} directory: {reason(e)}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".zobench-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{path}: the {what} directory is not writable: {reason(e)}") from None
    return path


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """``path`` can be written (its directory is writable) and, if it exists, is a writable regular file
    that is not a symbolic link."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path}: the {what} is a symbolic link; zobench does not write through links "
                          f"(name the file itself)")
    if path.exists() and not path.is_file():
        raise OutputError(f"{path}: cannot be the {what}: it exists and is not a regular file")
    check_output_dir(path.parent, what)
    if path.exists():
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise OutputError(f"{path}: the {what} is not writable: {reason(e)}") from None
    return path


def refuse_unsafe_target(path: str | Path, what: str, flag: str | None = None) -> Path:
    """``path`` resolved, unless it is a directory no tool may replace: ``/``, the home directory, the
    working directory or any directory above it. ``flag`` (``--save``) names where the path came from."""
    resolved = Path(os.path.abspath(path)).resolve()
    cwd = Path.cwd().resolve()
    home = Path(os.path.expanduser("~")).resolve()
    if resolved == Path(resolved.anchor):
        why = "the root directory"
    elif resolved == home:
        why = "your home directory"
    elif resolved == cwd:
        why = "the working directory"
    elif resolved in cwd.parents:
        why = "a parent of the working directory"
    else:
        return resolved
    named = f"{flag} {path}" if flag else str(path)
    raise UserError(f"{named}: is {why}; the {what} must be a directory of its own (e.g. {Path(path) / 'out'})")


def claim_dir(path: str | Path, what: str, is_ours: Callable[[Path], bool], overwrite: bool = False,
              flag: str = "--overwrite", name: str | None = None) -> Path:
    """Check that the directory ``path`` may become (or be replaced by) a new ``what``; returns it.

    Refused in one line: an unsafe target (``refuse_unsafe_target``), a path that exists and is not a
    directory, a non-empty directory that is not a complete ``what`` (``is_ours``), and an existing
    ``what`` without ``overwrite``. Call it before the work that produces the artifact, and again right
    before replacing (the directory may have changed meanwhile)."""
    refuse_unsafe_target(path, what, name)
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{path}: is a symbolic link; the {what} must be a directory of its own")
    if not path.exists():
        check_output_dir(path.parent, what)
        return path
    if not path.is_dir():
        raise UserError(f"{path}: exists and is not a directory; the {what} needs a directory of its own")
    if not any(path.iterdir()):
        return path
    if not is_ours(path):
        raise UserError(f"{path}: exists, is not empty and is not a {what}; zobench only replaces what it "
                        f"wrote (choose a new directory)")
    if not overwrite:
        raise UserError(f"{path}: a {what} is already there; pass {flag} to replace it")
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system
    cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    except (OSError, AttributeError):
        return False
    return rc == 0


AT_FDCWD, RENAME_EXCHANGE = -100, 2


def replace_dir(stage: Path, target: Path) -> None:
    """Put the finished directory ``stage`` at ``target`` (same filesystem), replacing what ``claim_dir``
    allowed. Where the system can, the two are swapped atomically, so ``target`` is at every instant the
    whole old or the whole new artifact; elsewhere the old one is moved aside first and removed only once
    the new one is in place."""
    if target.exists() and _exchange(stage, target):
        shutil.rmtree(stage, ignore_errors=True)  # now the old artifact
        return
    aside = None
    if target.exists():
        aside = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, aside)
    try:
        os.rename(stage, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)  # the old artifact back where it was
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def output_lock(path: str | Path, what: str = "results file"):
    """Hold the one-writer lock of ``path`` (a file appended to for a whole run) or refuse in one line.

    The lock is a hidden file beside it (``.NAME.lock``, holding the owner's pid for the message); it is
    an ``flock``, so it dies with its process and a killed run never blocks the next. It is per file, not
    per directory: two suites may share ``results/``."""
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise OutputError(f"{lock}: cannot create the lock of the {what}: {reason(e)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise UserError(f"{path}: another zobench run (pid {owner}) is writing this {what}; wait for it to "
                            f"end, or give this run another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


@contextlib.contextmanager
def build_lock(target: str | Path):
    """Hold an exclusive lock while the cache entry ``<cache>/<kind>/<name>`` is checked and, if missing, built.

    Cells running at once on one node (``--jobs``, Ray) that need the same mask or GPTQ layers would
    otherwise both build it: the second waits here, then finds the first one's entry. The lock file is
    ``<cache>/locks/<kind>-<name>.lock`` (a kind's folder holds entries only). The lock dies with its
    process (``flock``), so a killed builder never blocks the next. Where no lock file can be made (a
    read-only cache) the build goes ahead unlocked, as it would without a cache.
    """
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
