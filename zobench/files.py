"""Reading user files and writing outputs so that a bad file or a full disk costs one line, never a torn file.

Reads (suites, results, records, deltas, data) turn every way a file can be unusable (missing, a directory,
not readable, not UTF-8, too big, nested too deep) into a ``UserError`` naming the file. Every file zobench
parses is bounded (``MAX_*`` below): what it reads is data from someone else (docs/security.md), and a
hostile file must cost at most one line and a second, never minutes or the machine's memory.

Writes come in two shapes:

* ``atomic_write``: the bytes go to a temporary file beside the target, are flushed to disk, then renamed
  over it. A failure (ENOSPC, EDQUOT, EFBIG, EIO, ...) removes the temporary file and leaves the old
  target as it was.
* ``append_line``: one line appended to a file on an ``O_APPEND`` descriptor. ``os.write`` may write
  fewer bytes than asked (a filesystem close to full does exactly that), so the rest is written in a
  loop; if any write fails the file is truncated back to its size before the append, so a reader never
  sees a fragment.

Both raise ``OutputError`` (a ``UserError``: one line, exit 2) naming the path and the reason, and neither
writes through a symbolic link. Where outputs go, and what may be replaced: ``zobench.outdirs``.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import fcntl
import gc
import json
import math
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from itertools import compress
from pathlib import Path
from typing import Any

from zobench.errors import NotJSON, OutputError, UserError, shown
from zobench.outdirs import check_output_dir
from zobench.outdirs import reason as _reason

# Bounds on what zobench parses. Far above anything it writes itself (a 7B suite's records are a few
# hundred KiB a line with its trajectory; the largest benchmark text field is SQuAD's 4.8 MB file, whose
# passages are a few KiB), low enough that a hostile file is refused at once.
MAX_CONFIG_BYTES = 1 << 20       # suite files, --set values, sidecar JSON (spec.json, meta.json, ...)
MAX_ARTIFACT_BYTES = 256 << 20   # delta.json (a dense run's trajectory: ~40 bytes a step), checkpoints
MAX_RECORD_BYTES = 64 << 20      # one line of a results file
MAX_DEPTH = 32                   # nesting of any parsed YAML/JSON (records nest 5 deep)
MAX_INT_DIGITS = 308             # an integer in a parsed YAML/JSON file: below 1e308, so any float holds it
MAX_TEXT_CHARS = 1_000_000       # one line of a line-based data file, one text field of a JSON data file
MAX_DATA_BYTES = 1 << 30         # a whole-document data file (SQuAD, DROP, an instruction file's JSON list)


def refuse_special(path: Path, what: str) -> None:
    """A FIFO, a device or a socket where a file is expected: reading one blocks forever (a FIFO) or never
    ends (``/dev/zero``)."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise UserError(f"{path}: not a regular file (a pipe, device or socket); expected a {what}")


def unreadable(path: Path, what: str, e: OSError) -> UserError:
    """Why a file cannot be opened, as one line a user can act on."""
    if isinstance(e, FileNotFoundError):
        return UserError(f"{path}: {what} not found")
    if isinstance(e, IsADirectoryError):
        return UserError(f"{path}: is a directory, expected a {what}")
    if isinstance(e, PermissionError):
        return UserError(f"{path}: {what} is not readable (permission denied)")
    return UserError(f"{path}: cannot read the {what}: {e.strerror or e}")


def read_text(path: str | Path, what: str = "file", max_bytes: int | None = None) -> str:
    """The UTF-8 text of ``path``, or a one-line ``UserError`` saying why it cannot be read (or that it is
    larger than ``max_bytes``)."""
    path = Path(path)
    refuse_special(path, what)
    try:
        if max_bytes is not None and path.is_file() and path.stat().st_size > max_bytes:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes, more than zobench reads in a {what} "
                            f"({max_bytes:,})")
        data = path.read_bytes()
    except OSError as e:
        raise unreadable(path, what, e) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start})") from None


def parse_json(text: str | bytes, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` bounded in depth; a ``UserError`` naming ``where`` for anything that is not JSON.

    Non-finite numbers (NaN, Infinity: Python's json accepts them, JSON does not) are refused too, and so are
    integers of more than ``MAX_INT_DIGITS`` digits (a float cannot hold them) and a key given twice in one
    object: zobench writes none, so one in a file is damage or a trap."""
    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number")

    def finite(literal):  # 1e999 is valid JSON and parses to inf
        value = float(literal)
        if not math.isfinite(value):
            raise ValueError(f"{literal[:40]} is too large for a number zobench reads")
        return value

    def whole(literal):  # a 400-digit integer is valid JSON, and overflows every float it meets later
        if len(literal.lstrip("-")) > MAX_INT_DIGITS:
            raise ValueError(f"{literal[:40]}... is too large for a number zobench reads")
        return int(literal)

    def once(pairs):  # {"lr": 1e-4, "lr": 1e-2} is valid JSON, and json keeps the last one silently
        d = dict(pairs)
        if len(d) != len(pairs):
            seen = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise ValueError(f"key '{shown(twice)}' given twice in one object")
        return d

    try:
        data = json.loads(text, parse_constant=no_constants, parse_float=finite, parse_int=whole,
                          object_pairs_hook=once)
    except RecursionError:
        raise NotJSON(where, f"nested deeper than zobench reads ({max_depth} levels)", syntax=False) from None
    except json.JSONDecodeError as e:
        raise NotJSON(where, f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise NotJSON(where, str(e)) from None
    # Every container comes from one '[' or '{' of the text: a text with fewer of them than the limit cannot
    # nest deeper (most records: their walk was a quarter of reading a large results file).
    if not isinstance(text, str) or text.count("[") + text.count("{") >= max_depth:
        check_depth(data, where, max_depth)
    # "\ud800" is valid JSON and parses to a lone surrogate, a string no encoder takes (a tokenizer, a hash, a
    # file write fail on it later): only a text that spells a surrogate escape is walked for one
    if (_SURROGATE_ESCAPE if isinstance(text, str) else _SURROGATE_ESCAPE_BYTES).search(text):
        _refuse_surrogates(data, where)
    return data


_SURROGATE_ESCAPE = re.compile(r"\\[uU][dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\[uU][dD][89a-fA-F]")


def _refuse_surrogates(data: Any, where: str) -> None:
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise NotJSON(where, "a string holds a lone surrogate (an escape such as \\ud800 that is not half "
                                     "of a pair): not text", syntax=False) from None


_is_container = frozenset((dict, list)).__contains__  # exact types: what json and safe YAML build


def check_depth(data: Any, where: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse containers nested deeper than ``max_depth`` (walked level by level, without recursion).

    Each level's containers are picked out in C (``compress`` over their values' types): a results file of
    100,000 records is walked in about two seconds, where a Python loop over every value took four."""
    level, depth = ([data] if _is_container(type(data)) else []), 0
    while level:
        depth += 1
        deeper: list = []
        for item in level:
            values = item.values() if type(item) is dict else item
            deeper.extend(compress(values, map(_is_container, map(type, values))))
        if deeper and depth >= max_depth:
            raise NotJSON(where, f"nested deeper than zobench reads ({max_depth} levels)", syntax=False)
        level = deeper


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector held off while a bulk read builds many containers that form no
    cycles (parsed JSON): its repeated full passes over the growing heap were a third of reading a
    100,000-record results file."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_json(path: str | Path, what: str = "file", max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """The parsed JSON of ``path``, bounded in size and depth, or one line saying what is wrong."""
    return parse_json(read_text(path, what, max_bytes), str(path))


def text_lines(path: str | Path, what: str = "data file", max_chars: int = MAX_TEXT_CHARS) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, refusing a line longer than ``max_chars`` in one line
    (a tokenizer given a 64 MB line aborts the process) without ever holding such a line whole."""
    path = Path(path)
    refuse_special(path, what)
    try:
        f = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise unreadable(path, what, e) from None
    with f:
        n = 0
        while True:
            try:
                line = f.readline(max_chars + 2)
            except UnicodeDecodeError:
                raise UserError(f"{path}:{_first_bad_line(path)}: {what} is not UTF-8 text") from None
            if not line:
                return
            n += 1
            if len(line.rstrip("\r\n")) > max_chars:
                raise UserError(f"{path}:{n}: a line longer than zobench reads in a {what} ({max_chars:,} "
                                f"characters); remove or shorten it")
            yield n, line


def _first_bad_line(path: Path) -> int:
    """The line of ``path`` that holds its first byte that is not UTF-8 (text reading decodes ahead of the line
    it returns, so the line it failed on is not the one at fault): the file read again in 64 KiB pieces."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 1
    with open(path, "rb") as f:
        while piece := f.read(1 << 16):
            try:
                decoder.decode(piece)
            except UnicodeDecodeError as e:
                return lines + piece[:max(e.start, 0)].count(b"\n")
            lines += piece.count(b"\n")
    return lines


def check_text(value: str, where: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """A text field read from a data file, refused when longer than ``max_chars``."""
    if isinstance(value, str) and len(value) > max_chars:
        raise UserError(f"{where}: a text of {len(value):,} characters, longer than zobench reads "
                        f"({max_chars:,}); remove or shorten it")
    return value


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # a write of zero bytes would loop forever: the device takes nothing more
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def _umask_at_import() -> int:
    mask = os.umask(0o022)  # reading the umask this way sets it: put it straight back (import, one thread)
    os.umask(mask)
    return mask


_UMASK = _umask_at_import()


def _umask() -> int:
    """The process's umask now: Linux says it in /proc/self/status without changing it; elsewhere, the one
    it had when zobench was imported."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK


def new_file_mode(path: str | Path) -> int:
    """The permissions a file written at ``path`` through a temporary file should get: the old file's, if
    there is one, else what ``open()`` would give a new file (0666 less the umask). A ``mkstemp`` file is
    0600, and renamed over its target it would make a report, a delta or a results file readable by its
    owner alone after every rewrite."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return 0o666 & ~_umask()
    return st.st_mode & 0o777 if stat.S_ISREG(st.st_mode) else 0o666 & ~_umask()


def temp_dir(parent: str | Path, prefix: str) -> Path:
    """A fresh directory in ``parent`` to build an artifact in before it is renamed into place, with the
    permissions ``mkdir`` would give it (``mkdtemp``'s are 0700: a delta or a cache renamed from it would
    be unreadable to anyone but its owner)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


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
            os.fchmod(fd, new_file_mode(path))
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
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise OutputError(f"{path}: the {what} is a symbolic link; zobench does not write through links") \
                from None
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


def cache_dir() -> Path:
    """Where converted models, masks and built kernels live (``$ZOBENCH_CACHE``, else ``~/.cache/zobench``)."""
    root = os.environ.get("ZOBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zobench")
    return Path(root)
