"""The `zobench` command. Each subcommand parses its flags, calls one function and sets the exit code.

Exit codes (``zobench.errors``): 0 success; 1 a budget is broken (``check``) and nothing else; 2 bad
input or an output that cannot be written (one line on stderr, no traceback); 3 cells failed
(``run --strict``); 4 an internal error (one line; the traceback is saved to a file it names).

Each command is one module here with ``add_parser(sub)`` and ``run(args) -> int``, imported only once the
command line has chosen it (``COMMANDS``): what one command needs is never loaded for another, so
``run --dry-run``, ``report`` and ``check`` on records import no torch.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import signal
import sys
import tempfile
import threading
import traceback

from zobench.cli.common import HELP, one_line
from zobench.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, UserError

# A command (the command line's first word) -> the module under zobench.cli that defines and runs it. This
# is the one place a command is chosen, by zobench's own code: its module is imported then, and only then.
COMMANDS = {"train": "train", "eval": "train", "run": "run", "report": "report", "check": "check",
            "estimate": "estimate", "influence": "influence"}


class Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line and a hint, not a usage block (exit 2)."""

    argv: list[str] = []  # the command line being parsed (main sets it), to name a mistyped flag

    def error(self, message: str):
        known = {s for a in self._actions for s in a.option_strings}
        unknown = [t.split("=", 1)[0] for t in self.argv if t.startswith("--") and t.split("=", 1)[0] not in known]
        if unknown and "unrecognized" not in message:
            # argparse names a missing required flag first; the typo that caused it is what to fix
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.75)
            message = f"unknown flag {unknown[0]}" + (f" (did you mean {close[0]}?)" if close else "") + \
                f"; {message}"
        _say(f"{self.prog}: error: {message} (see `{self.prog} --help`)")
        raise SystemExit(EXIT_INPUT)


def chosen(argv: list[str]) -> str | None:
    """The command that ``argv`` names, as argparse will read it: the first word that is not a flag (the top
    level has no flag that takes a value). None when that is no command: argparse then says so."""
    words = [a for a in argv if not a.startswith("-")]
    return words[0] if words and words[0] in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command, in ``zobench --help``'s order; only ``command``'s module is imported to add its flags,
    the others are listed by name and help line alone (all that is shown of them)."""
    parser = Parser(prog="zobench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    module = COMMANDS.get(command)
    added = set()
    for name, home in COMMANDS.items():
        if home != module:
            sub.add_parser(name, help=HELP[name])
        elif home not in added:  # a module adds all of its commands (train and eval) at the first one
            importlib.import_module(f"zobench.cli.{home}").add_parser(sub)
            added.add(home)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. This is the one guard at the command boundary: whatever happens below, the exit
    code means what the module docstring says, and the user sees one line, not a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Parser.argv = list(sys.argv[1:] if argv is None else argv)
    previous = _stop_on_sigterm()
    try:
        # a bad flag: one line and a --help hint, exit 2 (Parser.error); --help: exit 0
        args = build_parser(chosen(Parser.argv)).parse_args(argv)
        return importlib.import_module(f"zobench.cli.{COMMANDS[args.command]}").run(args)
    except UserError as e:
        _say(f"zobench: error: {one_line(e)}")
        return EXIT_INPUT
    except KeyboardInterrupt:
        _say("zobench: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`zobench estimate ... | head`): nothing to report
        return EXIT_OK
    except OSError as e:  # the machine refused: a path not readable or writable, a full disk
        where = f"{e.filename}: " if e.filename else ""
        _say(f"zobench: error: {where}{e.strerror or _first_line(e)}")
        return EXIT_INPUT
    except Exception as e:
        if os.environ.get("ZOBENCH_DEBUG"):
            raise
        saved = _save_traceback()
        _say(f"zobench: internal error: {type(e).__name__}: {_first_line(e)} ({saved}; please report it, "
             f"or set ZOBENCH_DEBUG=1 to see it here)")
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm():
    """SIGTERM (``kill``, a scheduler's stop, ``timeout``) stops a command as Ctrl-C does: running cells are
    killed through the executor, records already written stay. Without this, the default action ends the
    process at once and a running cell's process lives on. Returns the handler to restore (None where
    none was installed: not the main thread, or someone else's handler is there)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    return signal.SIG_DFL


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _save_traceback() -> str:
    try:
        fd, path = tempfile.mkstemp(prefix="zobench-traceback-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        return f"traceback in {path}"
    except OSError:
        return "traceback not saved: the temporary directory is not writable"
