"""What writing a report may replace: the report file and the plots it wrote, never a file of someone else's.

A report is ``<name>.md`` in ``--out`` (``--reports`` for ``zobench run``), its plots ``<name>_plots/*.png``;
a suite's ``name:`` chooses ``<name>``, so a suite file could otherwise point zobench at any markdown file or
PNG in that folder. zobench replaces (or, for a plot with no data this time, removes) only what it can tell
it wrote:

* a report carries ``MARK`` as its last line (an HTML comment: invisible where the markdown is rendered).
  A report from before the mark is recognised by its first line (``# zobench report: ...`` or an influence
  report's question);
* a plot carries the PNG text chunk ``Software: zobench``; one from before the mark counts as zobench's
  where the report it replaces, itself zobench's, links it.

Anything else is refused in one line before a file is written.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from zobench.errors import OutputError

MARK = "<!-- written by zobench report: it replaces this file, and the plots it links, only while this line is here -->"
PNG_SOFTWARE = "zobench"  # savefig(metadata={"Software": PNG_SOFTWARE})
_LEGACY_FIRST_LINES = (re.compile(r"# zobench report"),
                       re.compile(r"# .*: which training examples led to this generation\?$"))
_PNG = b"\x89PNG\r\n\x1a\n"
MAX_REPORT_BYTES = 64 << 20  # far above any report zobench writes (a few hundred KiB): a larger file is not one
_HEAD = 1 << 16  # a report's first line and a PNG's text chunks (before its image data) lie within this


def replaceable_plots(out_md: Path, folder: Path) -> set[str]:
    """The names of the plots in ``folder`` that the report ``out_md`` now there links (empty where there is
    none); an ``OutputError`` where ``out_md`` exists and is not a report zobench wrote."""
    if not out_md.exists():
        return set()
    text = _existing_text(out_md, "report")
    first = (text or "")[:_HEAD].split("\n", 1)[0]
    if text is None or (MARK not in text[-2 * len(MARK):] and not any(p.match(first) for p in _LEGACY_FIRST_LINES)):
        raise OutputError(f"{out_md}: exists and is not a report zobench wrote; zobench replaces only its own "
                          f"reports (choose another report folder, or move the file)")
    return set(re.findall(rf"\]\({re.escape(folder.name)}/([^)/]+\.png)\)", text))


def _existing_text(path: Path, what: str) -> str | None:
    """The text of the file zobench would replace at ``path``; None where it is not a regular file of at most
    ``MAX_REPORT_BYTES`` (then it is not zobench's); an ``OutputError`` where it cannot be read."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_REPORT_BYTES:
            return None
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise OutputError(f"{path}: cannot read the {what} zobench would replace ({e.strerror})") from None


PAGE_MARK = "<!-- written by zobench influence query: it replaces this page only while this line is here -->"
_LEGACY_PAGE = "<!doctype html><meta charset=utf-8><body style='font-family:sans-serif;max-width:60em'><h2>"


def check_replaceable_page(path: Path) -> None:
    """An ``OutputError`` where ``path`` exists and is not a page ``zobench influence query --html`` wrote
    (it ends with ``PAGE_MARK``; one from before the mark starts as those pages did)."""
    if not path.exists():
        return
    text = _existing_text(path, "page") or ""
    if not (text.rstrip().endswith(PAGE_MARK) or text.startswith(_LEGACY_PAGE)):
        raise OutputError(f"{path}: exists and is not a page zobench wrote; zobench replaces only its own pages "
                          f"(choose another --html, or move the file)")


def marked_png(path: Path) -> bool:
    """Whether the PNG at ``path`` carries zobench's text chunk (read up to its image data, at most 64 KiB)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
    except OSError:
        return False
    if not head.startswith(_PNG):
        return False
    at = len(_PNG)
    while at + 8 <= len(head):
        size, kind = struct.unpack(">I4s", head[at:at + 8])
        body = head[at + 8:at + 8 + size]
        if kind == b"tEXt" and body == b"Software\0" + PNG_SOFTWARE.encode():
            return True
        if kind in (b"IDAT", b"IEND"):
            return False
        at += 12 + size
    return False


def check_plot(path: Path, linked: set[str]) -> None:
    """``path`` may be written or removed: absent, or a regular file zobench wrote (``marked_png``, or linked
    by the report it replaces); else an ``OutputError``."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file() or not (marked_png(path) or path.name in linked):
        raise OutputError(f"{path}: exists and is not a plot zobench wrote; zobench replaces only its own plots "
                          f"(choose another report folder, or move the file)")
