"""Selectors: which cells a budget, an override or ``--only`` applies to.

A selector is a mapping of cell keys to a value or a list of values (``{method: [random, sensitive]}``),
or the same as text (``method=random|sensitive,quant=nf4``).
"""

from __future__ import annotations

import difflib
import functools
import math
from typing import Any

from zobench.errors import UserError, shown
from zobench.spec.config import CellConfig
from zobench.spec.yaml_text import parse_yaml


def unknown_key(where: str, key, known) -> UserError:
    close = difflib.get_close_matches(key, list(known), n=1) if isinstance(key, str) else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"{where}: unknown key '{shown(key)}'{hint}")


def parse_selector(sel: Any, where: str) -> dict[str, list]:
    if isinstance(sel, str):
        out: dict[str, list] = {}
        for part in filter(None, (p.strip() for p in sel.split(","))):
            if "=" not in part:
                raise UserError(f"{where}: selector part '{shown(part)}': expected key=value")
            k, v = part.split("=", 1)
            if not all(x.strip() for x in v.split("|")):
                raise UserError(f"{where}: selector part '{shown(part)}': a value is empty (key=a|b)")
            key = k.strip()
            if key in out:  # method=full,method=random kept the last silently: a cell is one or the other
                raise UserError(f"{where}: key '{shown(key)}' given twice; give its values once ({shown(key)}=a|b)")
            out[key] = [parse_yaml(x, f"{where} {shown(key)}={shown(x)}", lines=False) for x in v.split("|")]
        if not out:
            raise UserError(f"{where}: an empty selector; expected key=value[,key=value...]")
        sel = out
    if not isinstance(sel, dict):
        raise UserError(f"{where}: expected a mapping of cell keys to values")
    keys = set(CellConfig.keys())
    for k in sel:
        if k not in keys:
            raise unknown_key(where, k, keys)
    out = {k: v if isinstance(v, list) else [v] for k, v in sel.items()}
    for k, values in out.items():
        for v in values:  # .inf would be within any tolerance of every number: it matched every cell
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{where}: key '{shown(k)}' = {v}: expected a finite number")
    return out


def _number(x):
    return _text_number(x) if isinstance(x, str) else x


@functools.lru_cache(maxsize=4096)
def _text_number(x: str):
    """YAML reads "1e-3" (no dot) as text: a string that is a number compares as one. Cached: a check over
    100,000 records asks the same few strings (method names, backends) again and again, and each failed
    ``float`` is an exception."""
    try:
        return float(x)
    except ValueError:
        return x


def _same(a, b) -> bool:
    if a == b and type(a) is type(b):
        return True
    a, b = _number(a), _number(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        a, b = float(a), float(b)
        if not (math.isfinite(a) and math.isfinite(b)):
            return a == b
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    return a == b


def selector_matches(sel: dict[str, list], cell: dict[str, Any]) -> bool:
    return all(any(_same(cell.get(k), v) for v in vals) for k, vals in sel.items())
