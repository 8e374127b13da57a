"""Philox4x32-10 directions and the fused passes with torch ops: the same numbers as zo/kernels/zo_pass.c.

Runs where the C library does not: on CUDA, and on a CPU without a compiler. The definition of z (key,
counter, bit order, Box-Muller) is in zo_pass.c's header; this file follows it step for step.

uint32 arithmetic on int64 tensors: a product of two 32-bit words is below 2^64, and int64 multiplication
wraps modulo 2^64 (two's complement), so the wrapped result holds the true product's 64 bits. An
arithmetic shift by 32 then a mask gives the high word (the sign-filled top bits are masked away), a
mask the low word. The known-answer vectors with all-ones inputs (tests/test_fused.py) exercise products
above 2^63.

Passes go ``PHILOX_CHUNK`` values at a time (more on a GPU), so the temporaries stay bounded whatever the
tensor's size.
"""

from __future__ import annotations

import math

import torch

from zobench.zo.directions import sign_table
from zobench.zo.sizes import PHILOX_CHUNK, PHILOX_CHUNK_GPU

MASK = 0xFFFFFFFF
M0, M1 = 0xD2511F53, 0xCD9E8D57   # the round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85   # the key schedule's increments (golden ratio, sqrt(3) - 1)
TWO_PI_2M32 = 2 * math.pi * 2.0**-32  # exact: a power-of-two scaling of the double nearest 2 pi
# fdlibm's coefficients (e_log.c, k_sin.c, k_cos.c), as in zo_pass.c
LG = (6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01, 2.222219843214978396e-01,
      1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01)
LN2_HI, LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
SIN = (-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
       2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10)
COS = (4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
       -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11)
BYTE_SHIFTS = (0, 8, 16, 24)


def philox(ctr: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 of counters ``ctr`` (four int64 tensors holding uint32 words) under ``key``."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = c0 * M0, c2 * M1
        c0, c1, c2, c3 = ((p1 >> 32) & MASK) ^ c1 ^ k0, p1 & MASK, ((p0 >> 32) & MASK) ^ c3 ^ k1, p0 & MASK
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return [c0, c1, c2, c3]


def blocks(seed: int, first: int, count: int, device) -> list[torch.Tensor]:
    """The four output words of blocks ``first`` .. ``first + count - 1`` for ``seed``."""
    b = torch.arange(first, first + count, dtype=torch.int64, device=device)
    zero = torch.zeros_like(b)
    return philox([b & MASK, b >> 32, zero, zero], (seed & MASK, (seed >> 32) & MASK))


_ON_DEVICE: dict = {}  # device -> (byte shifts, sign table) there


def _constants(device) -> tuple[torch.Tensor, torch.Tensor]:
    """The byte shifts and the sign table on ``device``, copied there once: on a GPU a copy from host memory
    each draw would wait for the work queued before it, every pass."""
    device = torch.device(device)
    if device not in _ON_DEVICE:
        _ON_DEVICE[device] = (torch.tensor(BYTE_SHIFTS, dtype=torch.int64, device=device),
                              sign_table(torch.float32).to(device))
    return _ON_DEVICE[device]


def rademacher(seed: int, start: int, n: int, device) -> torch.Tensor:
    """z for global indices ``start`` .. ``start + n - 1``: 128 signs a block, bit b of the block at value b."""
    first, last = start >> 7, (start + n - 1) >> 7
    words = torch.stack(blocks(seed, first, last - first + 1, device), 1)
    shifts, signs = _constants(device)
    octets = ((words.unsqueeze(-1) >> shifts) & 0xFF).view(-1)  # byte k of a word: its bits 8k .. 8k+7
    z = signs[octets].view(-1)
    skip = start - first * 128
    return z[skip:skip + n]


def _log01(x: torch.Tensor) -> torch.Tensor:
    """log of float64 ``x`` in (0, 1): zo_pass.c's log01 (fdlibm's e_log.c), operation for operation."""
    bits = x.view(torch.int64)
    hx = (bits >> 32) & 0x000FFFFF
    i = (hx + 0x95F64) & 0x100000  # where the mantissa is above sqrt(2): halve it
    k = ((bits >> 52) - 1023 + (i >> 20)).double()
    f = (((hx | (i ^ 0x3FF00000)) << 32) | (bits & MASK)).view(torch.float64) - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (LG[0] + w * (LG[2] + w * (LG[4] + w * LG[6]))) + w * (LG[1] + w * (LG[3] + w * LG[5]))
    hfsq = 0.5 * f * f
    big = k * LN2_HI - ((hfsq - (s * (hfsq + r) + k * LN2_LO)) - f)
    small = k * LN2_HI - ((s * (f - r) - k * LN2_LO) - f)
    return torch.where(((hx - 0x6147A) | (0x6B851 - hx)) > 0, big, small)


def _sin_k(x: torch.Tensor) -> torch.Tensor:
    z = x * x
    w = z * z
    r = SIN[1] + z * (SIN[2] + z * SIN[3]) + z * w * (SIN[4] + z * SIN[5])
    return x + z * x * (SIN[0] + z * r)


def _cos_k(x: torch.Tensor) -> torch.Tensor:
    z = x * x
    w = z * z
    r = z * (COS[0] + z * (COS[1] + z * COS[2])) + w * w * (COS[3] + z * (COS[4] + z * COS[5]))
    hz = 0.5 * z
    one_hz = 1.0 - hz
    return one_hz + (((1.0 - one_hz) - hz) + z * r)


def gaussian(seed: int, start: int, n: int, device) -> torch.Tensor:
    """z for global indices ``start`` .. ``start + n - 1``: zo_pass.c's gaussian_tile, operation for operation."""
    first, last = start >> 2, (start + n - 1) >> 2
    words = blocks(seed, first, last - first + 1, device)
    out = []
    for p in (0, 1):
        rad = (_log01((words[2 * p].double() + 0.5) * 2.0**-32) * -2.0).sqrt()
        u = words[2 * p + 1]
        q, m = u >> 30, u & 0x3FFFFFFF
        mirror = m >> 29
        y = ((m ^ (mirror * 0x3FFFFFFF)).double() + 0.5) * TWO_PI_2M32
        sy, cy = _sin_k(y), _cos_k(y)
        swap = (mirror ^ (q & 1)).bool()
        sin_t = torch.where(swap, cy, sy) * (1 - 2 * (q >> 1)).double()  # a sign flip: exact
        cos_t = torch.where(swap, sy, cy) * (1 - 2 * ((q ^ (q >> 1)) & 1)).double()
        out += [(rad * cos_t).float(), (rad * sin_t).float()]
    z = torch.stack(out, 1).view(-1)
    skip = start - first * 4
    return z[skip:skip + n]


DRAW = {"rademacher": rademacher, "gaussian": gaussian}


def run_pass(live: torch.Tensor, offset: int, direction: str, seeds: list[int], coefs: list[float],
             nmaster: int, decay_at: int, decay: float, master: torch.Tensor | None = None,
             index: torch.Tensor | None = None) -> None:
    """``zo_pass`` of zo_pass.c (its comment says what each argument means) with torch ops."""
    draw = DRAW[direction]
    flat = live.view(-1)
    n = master.numel() if master is not None else flat.numel()
    chunk = PHILOX_CHUNK if live.device.type == "cpu" else PHILOX_CHUNK_GPU
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        own = master[a:b] if master is not None else flat[a:b]
        x = own if own.dtype == torch.float32 else own.float()
        for t in range(nmaster + 1):
            if t == decay_at:
                x.mul_(decay)
                _settle(own, x)
            if t == nmaster:
                break
            x.add_(draw(seeds[t], offset + a, b - a, x.device), alpha=coefs[t])
            _settle(own, x)
        if master is None:
            continue
        for t in range(nmaster, len(seeds)):  # into what the live weights get, never into the master
            x = x.add(draw(seeds[t], offset + a, b - a, x.device), alpha=coefs[t])
        if index is None:
            flat[a:b].copy_(x)
        else:
            flat.index_copy_(0, index[a:b], x.to(flat.dtype))


def _settle(own: torch.Tensor, x: torch.Tensor) -> None:
    """Store ``x`` where it belongs when it is a float32 copy of bf16/fp16 values: without a master each
    term is a pass of its own, and leaves its result rounded to the stored dtype."""
    if x is not own:
        own.copy_(x)
        x.copy_(own)
