"""Gate: Hugging Face ``datasets``, imported when a task's data comes from the hub (no ``--data-dir``).

Not a dependency of zobench: where it is not installed, the task says how to give its data instead.
"""

from __future__ import annotations


def load():
    """The datasets package, or None where it is not installed."""
    try:
        import datasets
    except ImportError:
        return None
    return datasets
