"""The report's numbers and tables: formatters from a value to its text, and the one table formatter.

Every table is a list of columns, each a header and a function from a cell to its text, so the tables share
one formatter and a missing value always renders as "-".
"""

from __future__ import annotations

from typing import Callable

from zobench.report.cells import EXTRA_ORDER, CellView, axis_value, density, method, pct, setting

Column = tuple[str, Callable[[CellView], str]]
DASH = "-"


# -- numbers -------------------------------------------------------------------------------------------

def num(v) -> str:
    """Times and rates: about three significant digits, without switching to exponents."""
    if not isinstance(v, (int, float)):
        return DASH
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def mib(v) -> str:
    return f"{v:.0f}" if isinstance(v, (int, float)) else DASH


def size_mib(nbytes) -> str:
    return f"{nbytes / 2**20:.2f}" if isinstance(nbytes, (int, float)) else DASH


def ratio(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else DASH


def sci(v) -> str:
    return f"{v:.3g}" if isinstance(v, (int, float)) else DASH


def count(v) -> str:
    """Parameter counts: 1234 -> 1.23k, 134515008 -> 135M."""
    if not isinstance(v, (int, float)):
        return DASH
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def scores(d: dict | None) -> str:
    """Accuracy as a percent; generative tasks as EM/F1 percents."""
    if not d:
        return DASH
    if "accuracy" in d:
        return f"{d['accuracy'] * 100:.1f}"
    return "/".join(f"{d[k] * 100:.1f}" if isinstance(d.get(k), (int, float)) else DASH for k in ("em", "f1"))


def pct_points(v) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) else DASH


def signed_points(a, b) -> str:
    return f"{100 * (a - b):+.1f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else DASH


def ms(seconds):
    return seconds * 1000 if isinstance(seconds, (int, float)) else None


def one_line(text, limit: int = 300) -> str:
    line = " ".join(str(text or DASH).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


# -- tables --------------------------------------------------------------------------------------------

def escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def key_columns(extras: list[str]) -> list[Column]:
    """The columns that name a cell, in the rows' sort order: varying model/task/dtype, then method, quant,
    density, then any other varying axis (lr, ...), so that rows differing only in lr sit together."""
    def axis(a: str) -> Column:
        return a, lambda r: axis_value(r, a)

    outer = [axis(a) for a in extras if a in EXTRA_ORDER]
    inner = [axis(a) for a in extras if a not in EXTRA_ORDER]
    return outer + [("method", method), ("quant", lambda r: str(setting(r, "quant") or "none")),
                    ("density", lambda r: pct(density(r)))] + inner


def table(columns: list[Column], recs: list[CellView], n_left: int) -> list[str]:
    """A markdown table, the first ``n_left`` columns left-aligned (names), the rest right (numbers)."""
    if not recs:
        return []
    head = "| " + " | ".join(escape(h) for h, _ in columns) + " |"
    rule = "|" + "|".join(":---" if i < n_left else "---:" for i in range(len(columns))) + "|"
    rows = ["| " + " | ".join(escape(fn(r)) for _, fn in columns) + " |" for r in recs]
    return [head, rule, *rows, ""]


def section(title: str, intro: str, columns: list[Column], recs: list[CellView], extras: list[str],
            n_text: int = 0) -> list[str]:
    """A titled table of ``recs``: the cell's name columns, then ``columns`` (the first ``n_text`` text)."""
    keys = key_columns(extras)
    body = table(keys + columns, recs, len(keys) + n_text)
    return [f"## {title}", "", intro, "", *body] if body else []
