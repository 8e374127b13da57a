"""Random perturbation directions z, regenerated from a seed instead of stored (MeZO's seed trick).

Why regenerate: storing z for every weight would cost a second copy of the model; re-drawing it from
the step's seed costs time instead. On a CPU that time dominates full ZO (a step needs three passes;
figures in results/bench/measurements.md).

Two distributions, both with E[z] = 0 and E[z z^T] = I, so the SPSA estimate
``(L(w + eps z) - L(w - eps z)) / (2 eps) * z`` is an unbiased estimate of the smoothed gradient:

* ``rademacher`` (default): z_i = +-1 with probability 1/2 each, SPSA's classic choice. Generated from
  raw 64-bit random words (one word yields 64 signs) expanded through a 256 x 8 sign table: several
  times cheaper than drawing normals on a CPU.
* ``gaussian``: z ~ N(0, I), MeZO's choice; use it to reproduce MeZO exactly.
"""

from __future__ import annotations

import torch

from zobench.errors import UserError
from zobench.spec.config import DIRECTIONS  # noqa: E402  (the names a suite may use)

_SIGN_TABLES: dict[torch.dtype, torch.Tensor] = {}


def sign_table(dtype: torch.dtype) -> torch.Tensor:
    """Row b holds the 8 bits of byte b as +-1 (bit 0 first)."""
    if dtype not in _SIGN_TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _SIGN_TABLES[dtype] = (bits * 2 - 1).to(dtype)
    return _SIGN_TABLES[dtype]


def check_direction(name: str) -> str:
    if name not in DIRECTIONS:
        raise UserError(f"unknown direction '{name}' (expected one of: {', '.join(DIRECTIONS)})")
    return name


def draw(numel: int, generator: torch.Generator, direction: str, dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw a flat z of ``numel`` values from ``generator`` (consumed in a fixed, reproducible way)."""
    device = torch.device(device)
    if direction == "gaussian":
        return torch.randn(numel, generator=generator, dtype=dtype, device=device)
    # Full 64-bit words: random_(from=int64 min, to=None) is torch's full-range form; the default
    # random_() would leave the top bit of every word at zero.
    words = torch.empty((numel + 63) // 64, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)
    table = sign_table(dtype).to(device)
    return table[words.view(torch.uint8).long()].view(-1)[:numel]


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
