"""Gate: bitsandbytes, imported when a layer is quantized to (or dequantized from) nf4, fp4 or int8.

A core dependency, but a cell quantized otherwise (or not at all) never imports it: its import costs
memory in the cell's process, and ``gates.hide`` keeps it away from such cells altogether.
"""

from __future__ import annotations


def load():
    """The bitsandbytes package (``bitsandbytes.nn``: ``Linear4bit``, ``Params4bit``, ``Linear8bitLt``...)."""
    import bitsandbytes

    return bitsandbytes


def functional():
    """``bitsandbytes.functional`` (``dequantize_4bit``)."""
    import bitsandbytes.functional as bf

    return bf
