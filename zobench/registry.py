"""One small name -> factory registry with did-you-mean errors.

Short names in user files (`method: sensitive`, `task: sst2`) resolve here. Factories may be dotted
"module:attr" strings so optional backends are imported only when asked for. A name registered twice is
refused (lm-evaluation-harness's registries do the same): two plug-ins never silently shadow each other.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from zobench.errors import UserError, shown


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._aliases: set[str] = set()

    def register(self, name: str, factory: Any = None, alias: bool = False):
        """Register `factory` (an object or a "module:attr" string); usable as a decorator.

        An ``alias`` resolves like its name but is left out of ``names()`` and did-you-mean hints.
        """
        if name.lower() in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        if alias:
            self._aliases.add(name.lower())
        if factory is None:
            def deco(obj: Callable) -> Callable:
                self._items[name.lower()] = obj
                return obj
            return deco
        self._items[name.lower()] = factory
        return factory

    def names(self) -> list[str]:
        return sorted(n for n in self._items if n not in self._aliases)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._items

    def check(self, name: str) -> str:
        """``name`` if registered, else a one-line ``UserError`` with the known names and a did-you-mean.
        Imports nothing (a lazy entry stays a string)."""
        key = str(name).lower()
        if key not in self._items:
            close = difflib.get_close_matches(key, self.names(), n=1) if len(key) <= 100 else []
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown {self.kind} '{shown(name)}' (known: {', '.join(self.names())}){hint}")
        return key

    def get(self, name: str) -> Any:
        key = self.check(name)
        item = self._items[key]
        if isinstance(item, str) and ":" in item:
            module, attr = item.split(":", 1)
            item = getattr(importlib.import_module(module), attr)
            self._items[key] = item
        return item
