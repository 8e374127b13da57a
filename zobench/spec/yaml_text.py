"""YAML as zobench reads it: suite files and the values of ``--set`` and ``--only``, bounded and strict.

A suite file, or a value typed after a flag, may come from anyone (docs/security.md): it is parsed by
PyYAML's safe loader (no tag builds a Python object) with the bounds below, and any way it is not valid
YAML becomes one ``UserError`` naming where it came from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from zobench.errors import UserError
from zobench.files import MAX_CONFIG_BYTES, MAX_DEPTH, MAX_INT_DIGITS, read_text


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, bounded and strict, because a suite file may come from anyone (docs/security.md):

    * no anchors or aliases: an alias bomb ("billion laughs") expands a 1 KiB file into gigabytes;
      suites have no use for them (``overrides`` and ``defaults`` say the same thing plainly);
    * nesting at most ``MAX_DEPTH`` deep (a deeply nested file ends in RecursionError otherwise);
    * a key given twice in one mapping is an error (PyYAML keeps the last silently, so a suite could run
      with a setting its author did not see);
    * plain values are typed as YAML 1.2's core schema types them, not as YAML 1.1 (PyYAML's default) does,
      where ``seed: 010`` is 8 (octal), ``steps: 1:30`` is 90 (base 60), ``yes`` / ``on`` are booleans,
      a date is a date object and ``1e-4`` is a string: here only ``true`` / ``false`` are booleans,
      ``1e-4`` is a number, and the rest stay the strings they were written as (a setting that wants a
      number then says so). A decimal integer with a leading zero is refused: the two YAMLs disagree on it."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&, *) are not allowed in zobench "
                                              "files", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                        key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        """An integer a float can hold (``MAX_INT_DIGITS``): a longer one overflows every float it meets later
        (and past Python's 4,300 digits is a ValueError, not a YAML error)."""
        too_large = yaml.constructor.ConstructorError(None, None, "an integer too large for a number zobench reads",
                                                      node.start_mark)
        text = str(node.value)
        if len(text) > 4 * MAX_INT_DIGITS:  # (hex: more characters a digit)
            raise too_large
        digits = text.lstrip("+-").replace("_", "")
        if len(digits) > 1 and digits[0] == "0" and digits[1] in "0123456789":
            raise yaml.constructor.ConstructorError(
                None, None, f"'{text}': an integer with a leading zero is octal in YAML 1.1 and decimal in 1.2; "
                "write it without the zero (or 0o... for octal)", node.start_mark)
        if digits.startswith("0o"):
            value = int(digits[2:], 8) * (-1 if text.startswith("-") else 1)
        else:
            value = super().construct_yaml_int(node)
        if abs(value) >= 10**MAX_INT_DIGITS:
            raise too_large
        return value


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)

# YAML 1.2's core schema for booleans, integers and floats (https://yaml.org/spec/1.2.2/#1032-tag-resolution),
# plus digit groups (1_000) in decimal integers, which PyYAML took and zobench's suites may use; no timestamps.
_YAML_11_TYPES = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                  "tag:yaml.org,2002:timestamp"}
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_11_TYPES]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_CORE = [
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("tag:yaml.org,2002:float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
]
for _tag, _pattern, _first in _CORE:
    _StrictLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))

# An explicit tag (`!!bool yes`, `!!int 0x1_0`, `!!binary ...`, `!!timestamp ...`) would bring back the
# YAML 1.1 spellings and types the resolvers above leave out: a tagged scalar must be spelled as the core
# schema spells its type, and the types outside it (bytes, dates, sets, ordered pairs) are refused.
_SPELLED = {tag: re.compile(pattern) for tag, pattern, _ in _CORE}
_NAMED = {"tag:yaml.org,2002:bool": "true or false", "tag:yaml.org,2002:int": "an integer",
          "tag:yaml.org,2002:float": "a number"}


def _core_only(construct):
    def checked(loader, node):
        if isinstance(node, yaml.ScalarNode) and not _SPELLED[node.tag].match(str(node.value)):
            raise yaml.constructor.ConstructorError(
                None, None, f"'{node.value}' is not {_NAMED[node.tag]} as YAML 1.2 spells one",
                node.start_mark)
        return construct(loader, node)
    return checked


for _tag in _SPELLED:
    _StrictLoader.add_constructor(_tag, _core_only(_StrictLoader.yaml_constructors[_tag]))


def _refuse_type(loader, node):
    raise yaml.constructor.ConstructorError(None, None, f"the tag {node.tag.replace('tag:yaml.org,2002:', '!!')} "
                                            f"is not read by zobench (strings, numbers, true/false, null, lists "
                                            f"and mappings only)", node.start_mark)


for _tag in ("binary", "timestamp", "set", "omap", "pairs"):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_type)


def parse_yaml(text: str, where: str, lines: bool = True) -> Any:
    """Parse YAML text from a file or the command line with the bounded loader above; an error names
    ``where`` and, with ``lines`` (a file), the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark and lines else ""
        problem = (str(getattr(e, "problem", None) or e).strip().splitlines() or ["?"])[0]
        raise UserError(f"{where}{at}: not valid YAML ({problem})") from None
    except RecursionError:
        raise UserError(f"{where}: nested deeper than zobench reads ({MAX_DEPTH} levels)") from None


def load_yaml(path: str | Path, what: str = "suite file") -> Any:
    """The parsed YAML of a suite file, or one line saying why it cannot be read."""
    path = Path(path)
    return parse_yaml(read_text(path, what, MAX_CONFIG_BYTES), str(path))
