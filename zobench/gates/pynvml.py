"""Gate: NVIDIA's management library (``nvidia-ml-py``, import name ``pynvml``), imported where a GPU's memory
or driver is read: on CUDA only, so a CPU cell's process never loads it."""

from __future__ import annotations


def load():
    """The pynvml module (raises ImportError where it is not installed: callers record why)."""
    import pynvml

    return pynvml
