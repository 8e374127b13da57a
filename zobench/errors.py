"""User-facing errors and the command line's exit codes.

A `UserError` is bad input (a file, a key, a name, an output location): the CLI prints its message as one
line and exits 2, without a traceback. Anything else is a bug: the CLI prints one line saying where the
traceback was saved and exits 4, so that no crash is ever read as "a budget is broken" (exit 1).
"""

EXIT_OK = 0
EXIT_BUDGET = 1        # zobench check: a budget is broken. Nothing else exits 1.
EXIT_INPUT = 2         # bad input or an output that cannot be written; one line on stderr
EXIT_CELLS_FAILED = 3  # zobench run --strict: a cell failed, timed out or crashed
EXIT_INTERNAL = 4      # a bug in zobench: one line, the traceback saved to a file
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input from the user; the message names what was wrong and what was expected. It is one line by
    construction: control characters that a name or value read from a file brought into it (a key may hold
    a newline) are escaped, as ``shown`` does."""

    def __init__(self, *args):
        if args and isinstance(args[0], str):
            args = (_printable(args[0]), *args[1:])
        super().__init__(*args)


def _printable(text: str) -> str:
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class NotJSON(UserError):
    """A file or line that is not JSON zobench reads: "WHERE: not valid JSON (DETAIL)" when the parser refused
    it, "WHERE: DETAIL" when zobench's own bounds did. ``detail`` alone is there for a caller that words the
    line its own way (a results file's corrupt record)."""

    def __init__(self, where: str, detail: str, syntax: bool = True):
        super().__init__(f"{where}: not valid JSON ({detail})" if syntax else f"{where}: {detail}")
        self.detail = _printable(detail)


class OutputError(UserError):
    """An output could not be written (unwritable location, full disk); nothing partial was left behind."""


class Unsupported(UserError):
    """A valid request this machine or combination cannot run (no GPU, full ZO on 4-bit weights, ...).

    Suites record such cells with status "unsupported" and the reason, instead of as failures.
    """


def shown(value, limit: int = 60) -> str:
    """A name or value read from a file, fit for a one-line message: control characters escaped (a key
    may hold a newline), cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    text = _printable(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."
