"""The executor interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterator

from zobench.cell.record import CellRecord
from zobench.spec.matrix import Cell

# on_event(kind, data): "start" {cell}, "progress" {cell, step, steps, loss}; the driver reports "done".
OnEvent = Callable[[str, dict], None]


class Executor(ABC):
    name = "?"

    def __init__(self, on_event: OnEvent | None = None):
        self.on_event = on_event or (lambda kind, data: None)

    @abstractmethod
    def submit(self, cell: Cell, timeout_s: float) -> None:
        """Queue ``cell``; it runs in a fresh process and is killed after ``timeout_s`` seconds."""

    @abstractmethod
    def finished(self) -> Iterator[tuple[Cell, CellRecord]]:
        """Run what was submitted; yield each cell with its record as it finishes (any order). A cell's own
        failure (exception, OOM kill, timeout, unsupported) is a record with that status, never an
        exception here."""

    def close(self) -> None:
        """Stop what still runs and release resources; safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
