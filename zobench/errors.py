"""User-facing errors.

A `UserError` is bad input (a file, a key, a name): the CLI prints its message as one line and exits 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user; the message names what was wrong and what was expected."""
