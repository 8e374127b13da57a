"""Tensors to and from a binary file as their raw bytes: how kept weights and codes go to disk (no pickle,
no second copy in memory)."""

from __future__ import annotations

import torch


def _bytes_of(t: torch.Tensor):
    """A writable byte view of a contiguous CPU tensor's storage (any dtype, bfloat16 included)."""
    return t.view(-1).view(torch.uint8).numpy().data


def write_raw(f, tensors, rewind: bool = True) -> None:
    """``tensors`` to the binary file ``f`` as raw bytes, one after the other (no pickle, no second copy in
    memory: CPU tensors are written from their own storage); from its start unless ``rewind`` is false."""
    if rewind:
        f.seek(0)
    for t in tensors:
        f.write(_bytes_of(t.contiguous().cpu()))
    f.flush()


def read_raw(f, t: torch.Tensor, what: str) -> None:
    """Read ``t``'s bytes from ``f`` into it (as ``write_raw`` wrote them); OSError on a short file."""
    host = t if t.device.type == "cpu" and t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype)
    view = _bytes_of(host)
    if f.readinto(view) != len(view):
        raise OSError(f"{getattr(f, 'name', what + ' file')}: shorter than the {what} it was written from")
    if host is not t:
        t.copy_(host)
