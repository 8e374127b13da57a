"""Gate: bitsandbytes, imported when a layer is quantized to (or dequantized from) nf4, fp4 or int8.

A core dependency, but a cell quantized otherwise (or not at all) never imports it: its import costs
memory in the cell's process, and ``gates.hide`` keeps it away from such cells altogether.
"""

from __future__ import annotations

import logging


class _CastNotice(logging.Filter):
    """bitsandbytes logs, at every int8 forward, that it casts the inputs to float16 for its int8 product:
    a fact of the int8 backend (the README says it), not something a user can act on, and thousands of
    lines in a run's log. The filter drops that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def load():
    """The bitsandbytes package (``bitsandbytes.nn``: ``Linear4bit``, ``Params4bit``, ``Linear8bitLt``...)."""
    import bitsandbytes

    casts = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _CastNotice) for f in casts.filters):
        casts.addFilter(_CastNotice())
    return bitsandbytes


def functional():
    """``bitsandbytes.functional`` (``dequantize_4bit``)."""
    import bitsandbytes.functional as bf

    return bf
