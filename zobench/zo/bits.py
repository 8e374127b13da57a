"""Packed bit flags over a flat tensor's values: bit p is bit p % 8 of byte p // 8, the C passes' layout
(zo/kernels/zo_pass.c), so that the torch path and the C library read and write the same bytes."""

from __future__ import annotations

import torch

BIT = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def within(positions: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The ``positions`` in ``start`` .. ``stop - 1``, counted from ``start``."""
    return positions[(positions >= start) & (positions < stop)] - start


def get_bits(bits: torch.Tensor, pos: int, n: int) -> torch.Tensor:
    """Bits ``pos`` .. ``pos + n - 1`` of ``bits`` (bit p is bit p % 8 of byte p // 8, the C passes' layout),
    as bools."""
    first = pos // 8
    chunk = bits[first:(pos + n + 7) // 8]
    flat = ((chunk.view(-1, 1) & BIT.to(bits.device)) != 0).view(-1)
    return flat[pos - 8 * first:pos - 8 * first + n]


def put_bits(bits: torch.Tensor, pos: int, flags: torch.Tensor) -> None:
    """Write ``flags`` (bool) as bits ``pos`` .. of ``bits``; the other bits of the bytes touched are kept."""
    n, first = flags.numel(), pos // 8
    lead = pos - 8 * first
    nbytes = (lead + n + 7) // 8
    cur = get_bits(bits, 8 * first, 8 * nbytes).to(torch.uint8)
    cur[lead:lead + n] = flags
    bits[first:first + nbytes] = (cur.view(-1, 8) * BIT.to(bits.device)).sum(1, dtype=torch.uint8)
