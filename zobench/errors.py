"""User-facing errors.

A `UserError` is bad input (a file, a key, a name): the CLI prints its message as one line and exits 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user; the message names what was wrong and what was expected."""


class Unsupported(UserError):
    """A valid request this machine or combination cannot run (no GPU, full ZO on 4-bit weights, ...).

    Suites record such cells with status "unsupported" and the reason, instead of as failures.
    """
