"""What several commands' flags share, importing nothing of zobench (``zobench --help`` reads it): each
command's line in ``zobench --help``, the flag no file may set, argparse types with one-line errors."""

from __future__ import annotations

import argparse

HELP = {
    "train": "run one fine-tuning and write its record (OUT/record.json)",
    "eval": "evaluate a saved result (--save) on a task, without training",
    "run": "run a suite: every cell in a fresh process, then the report",
    "report": "markdown report with plots from a results file",
    "check": "exit 1 when a budget is broken",
    "estimate": "predicted peak memory of every cell of a suite (no weights loaded)",
    "influence": "training-data influence: cache sketched gradients, query them",
}


def trust_flag(p) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model's own Python code (transformers' trust_remote_code); never taken from a "
                        "suite or delta file")


def at_least(low: int, high: int = 10**9):
    """An argparse type: a whole number in [low, high], else one line naming the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a number from {low} to {high:g}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def one_line(e: Exception) -> str:
    """A bad-input message as one line: a newline inside it (a key or path read from a file) is shown
    escaped rather than splitting the message or cutting it short."""
    return str(e).strip().replace("\r", "\\r").replace("\n", "\\n") or type(e).__name__
