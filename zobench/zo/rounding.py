"""Stochastic rounding onto a grid, its noise drawn from the engine's counter-based generator.

Stochastic rounding puts a value x between two neighbouring levels lo <= x < hi on hi with probability
(x - lo) / (hi - lo) and on lo otherwise, so that E[round(x)] = x exactly: QuZO (``methods.quzo``) moves
low-bit codes by steps far smaller than one level and stays unbiased only this way (round-to-nearest would
drop every move below half a level). A value already on the grid rounds to itself.

The noise is Philox4x32-10 (``zo.philox``), keyed by a seed and the value's global index, like z: a run's
roundings replay from its seeds, on any device and in any chunking. ``noise_seed`` derives the seeds of
independent streams (the perturbation's rounding, the update's) from a step's seed. A value's noise has 16
bits drawn for every value and a fine part drawn only where those 16 bits alone cannot decide (``uniform``):
the rounding is as exact as a 40-bit uniform's, for the Philox work of 16 bits a value.
"""

from __future__ import annotations

import torch

from zobench.zo import fused
from zobench.zo.philox import MASK, blocks

STREAMS = {"perturb": 1, "update": 2}


def noise_seed(seed: int, stream: str) -> int:
    """The seed of ``stream``'s rounding noise for the step seed ``seed``: a stream of its own, independent of
    z(seed) and of the other streams (another Philox key)."""
    return (int(seed) * 0x9E3779B97F4A7C15 + STREAMS[stream] * 0xBF58476D1CE4E5B9 + 1) % (1 << 62)


TIE_KEY = 0xD1B54A32D192ED03  # the key of the noise's fine part: seed ^ TIE_KEY (zo_pass.c's TIE_KEY)


def uniform(seed: int, start: int, n: int, device) -> torch.Tensor:
    """U(0, 1) noise for global indices ``start`` .. ``start + n - 1`` (float64, never 0 or 1), in two parts:
    U = (h + v) / 2^16, h the value's 16 bits (half i % 2, the low half first, of word (i / 2) % 4 of Philox
    block i / 8) and v in (0, 1) from another key (``seed ^ TIE_KEY``: word i % 4 of block i / 4, its top 23
    bits plus half a step). Exact in float64, and so is 1 - U. A rounding asks only whether U < f: with
    T = floor(2^16 f) that is h < T, or v < 2^16 f - T where h == T, so the C passes draw v for one value in
    65536 (half the Philox work of a 32-bit draw per value, with finer steps). On a CPU from the C library
    (``zo_uniform`` in zo/kernels/zo_pass.c), elsewhere with torch ops: the same numbers."""
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=device)
    if torch.device(device).type == "cpu" and (out := fused.c_uniform(seed, start, n)) is not None:
        return out
    first, last = start >> 3, (start + n - 1) >> 3
    words = torch.stack(blocks(seed, first, last - first + 1, device), 1)  # (blocks, 4): a block's words in order
    halves = torch.stack([words & 0xFFFF, words >> 16], 2).view(-1)
    skip = start - first * 8
    h = halves[skip:skip + n]
    first, last = start >> 2, (start + n - 1) >> 2
    key = seed ^ TIE_KEY
    words = torch.stack(blocks(key, first, last - first + 1, device), 1).view(-1)
    skip = start - first * 4
    v = (((words[skip:skip + n] & MASK) >> 9).float() + 0.5) * 2.0**-23
    return (h.double() + v.double()) * 2.0**-16


# A move of more steps than this takes any int8 code out of [-127, 127] whatever its size, so moves are
# clamped to it before rounding: a step of ~1e-32 (a row of tiny scale) otherwise gave a move past int64's
# range, which converts to int64's minimum and wrapped round the code's addition (a clamped update then went
# the wrong way). zo_pass.c's int8 pass clamps at the same bound.
MAX_STEPS = float(1 << 20)


def steps(x: torch.Tensor) -> torch.Tensor:
    """``x`` (a move in grid steps) clamped to +-``MAX_STEPS``."""
    return x.clamp(-MAX_STEPS, MAX_STEPS)


def round_offset(x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """``x`` (in grid steps, within +-``MAX_STEPS``: ``steps``) rounded to a whole number of steps (int64):
    stochastically with ``noise`` (uniform, one per value), to the nearest without (a tie goes up)."""
    low = torch.floor(x)
    frac = x - low
    up = frac >= 0.5 if noise is None else noise < frac
    return low.long() + up.long()


def round_to_levels(x: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """The index into ``levels`` (sorted ascending, distinct) that ``x`` rounds to (int64): between its two
    neighbouring levels, stochastically with ``noise`` or to the nearest without. Values beyond the grid go
    to its end levels."""
    levels = levels.to(x.dtype)
    x = x.clamp(levels[0], levels[-1])
    hi = torch.searchsorted(levels, x, right=True).clamp_(1, levels.numel() - 1)
    lo = hi - 1
    base = levels[lo]
    frac = (x - base) / (levels[hi] - base)
    up = frac >= 0.5 if noise is None else noise < frac
    return lo + up.long()
