"""RapidGrad: a streaming random sketch of a flat gradient, D values down to K.

RapidIn (arXiv 2405.11724) compresses each per-example gradient g of dimension D (the concatenation of
every trainable tensor's gradient, each at a fixed offset) to K values:

    (S g)[b] = sum over the coordinates j with bin(j) == b of sign(j) * g[j],   bin(j) = perm(j) * K // D

that is, a random permutation of the D coordinates, a Rademacher sign per coordinate, then sums over K
contiguous, balanced bins of the permuted vector. Influence then uses <S g_train, S g_query> in place of
<g_train, g_query>.

Why it is unbiased: the signs are independent with E[sign(i) sign(j)] = [i == j], so for any fixed
permutation E<Sx, Sy> = sum_b sum_{i, j in b} E[s_i s_j] x_i y_j = <x, y>. The permutation only decides
which coordinates collide; spreading them at random (instead of summing neighbours of the same tensor,
whose gradients are correlated) keeps the variance near (|x|^2 |y|^2 + <x, y>^2) / K.

Why a Feistel network and not ``torch.randperm(D)``: for Llama-2-7B (D = 6.7e9) an explicit permutation
is 54 GB of int64, more than the GPU holds. A keyed Feistel network is a bijection on [0, 4^h) computed
from the index alone, and cycle-walking (re-apply while the result is >= D) turns it into a bijection on
[0, D), so any chunk of coordinates gets its bins on the fly with no D-sized state. The sign is an
independent keyed hash of the index. Both are rebuilt from ``SketchConfig`` (dim, k, seed), so a cached
sketch is reproducible and a projector is never pickled.

Nesting: bins are contiguous in permuted order and bin = pos * K // D, so for K = r * k the k-bin sketch
is exactly the sum of r adjacent K-bins (floor(floor(x * r) / r) == floor(x)). ``nest`` therefore derives
several smaller K from one stored sketch (an accuracy-versus-K curve needs a single backward pass).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields

import torch

from zobench.errors import UserError

_MIX = 0x45D9F3B  # odd multiplier of a well-known 32-bit integer hash; < 2^27, so x * _MIX < 2^58
_M31 = 0x7FFFFFFF
_ROUNDS = 4  # Luby-Rackoff: four rounds of a pseudo-random function give a pseudo-random permutation
CHUNK = 1 << 22  # indices hashed at once on the on-the-fly path: ~100 MB of int64 temporaries


def _mix(x: torch.Tensor, key: int) -> torch.Tensor:
    """Keyed hash of int64 values in [0, 2^31) into [0, 2^31); every product stays below 2^63."""
    x = (x ^ key).mul_(_MIX).bitwise_and_(_M31)
    x = (x ^ (x >> 16)).mul_(_MIX).bitwise_and_(_M31)
    return x ^ (x >> 16)


@dataclass(frozen=True)
class SketchConfig:
    """Everything that defines a sketch; two equal configs give bit-identical bins and signs.

    ``permute=False`` (contiguous bins of the raw layout) and ``signs=False`` (all +1) are ablations
    for the fidelity benchmark, not settings to use.
    """

    dim: int
    k: int = 65536
    seed: int = 0
    permute: bool = True
    signs: bool = True

    def __post_init__(self):
        for name in ("dim", "k", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"sketch config: key '{name}' must be an integer, got {value!r}")
        if self.dim < 1:
            raise UserError(f"sketch config: key 'dim' must be >= 1, got {self.dim}")
        if not 1 <= self.k <= self.dim:
            raise UserError(f"sketch config: key 'k' must be in [1, dim={self.dim}], got {self.k}")
        # pos * k is computed in int64; this bound also gives k < 2^31, so bins fit int32.
        if self.dim * self.k >= 1 << 62:
            raise UserError(f"sketch config: dim * k = {self.dim * self.k} must stay below 2^62; lower 'k'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SketchConfig":
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise UserError(f"sketch config: unknown key {key!r}; expected one of {sorted(known)}")
        return cls(**d)


class Sketcher:
    """Adds the sketch of any slice of a flat gradient into a [..., K] float32 accumulator.

    Bins and signs are hashed from the coordinate index on the fly. Up to ``plan_limit`` coordinates of
    (offset, n) spans are also cached (int32 bins, int8 signs: 5 bytes a coordinate), because the
    per-example loop adds every tensor at the same offset for every example; the budget keeps the cache
    bounded whatever spans the caller uses.
    """

    def __init__(self, cfg: SketchConfig, plan_limit: int = 1 << 27):
        self.cfg = cfg
        self.dim, self.k = cfg.dim, cfg.k
        rng = random.Random(cfg.seed)
        self._round_keys = [rng.getrandbits(31) for _ in range(_ROUNDS)]
        self._sign_keys = (rng.getrandbits(31), rng.getrandbits(31))
        # Half width h with 4^h >= dim; h <= 31 (dim < 2^62), so each half fits the 31-bit hash.
        self._h = max(1, ((cfg.dim - 1).bit_length() + 1) // 2)
        self._half = (1 << self._h) - 1
        self._plan_limit = plan_limit
        self._planned = 0
        self._plans: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- the maps, on int64 index tensors ------------------------------------------------------------

    def _feistel(self, x: torch.Tensor) -> torch.Tensor:
        h, m = self._h, self._half
        left, right = x >> h, x & m
        for key in self._round_keys:
            left, right = right, left ^ (_mix(right, key) & m)
        return (left << h) | right

    def perm(self, idx: torch.Tensor) -> torch.Tensor:
        """The keyed bijection on [0, dim), applied elementwise to int64 indices."""
        pos = self._feistel(idx)
        todo = (pos >= self.dim).nonzero().squeeze(1)
        # Cycle-walking: x's orbit under the bijection on [0, 4^h) returns to [0, dim), and following
        # it from every x < dim restricts the map to a bijection on [0, dim). 4^h < 4 * dim, so the
        # expected number of extra passes is below 3, each on the shrinking set still out of range.
        while todo.numel():
            walked = self._feistel(pos[todo])
            pos[todo] = walked
            todo = todo[walked >= self.dim]
        return pos

    def bins(self, idx: torch.Tensor) -> torch.Tensor:
        """Bin in [0, k) of each coordinate index (int64)."""
        pos = self.perm(idx) if self.cfg.permute else idx
        return torch.div(pos * self.k, self.dim, rounding_mode="floor")

    def signs(self, idx: torch.Tensor) -> torch.Tensor:
        """Rademacher sign (int8, +1 or -1) of each coordinate index."""
        if not self.cfg.signs:
            return torch.ones_like(idx, dtype=torch.int8)
        k_lo, k_hi = self._sign_keys
        # Indices may exceed 2^31: hash the low 31 bits, then fold in the high part and hash again.
        hashed = _mix(_mix(idx & _M31, k_lo) ^ (idx >> 31), k_hi)
        return ((hashed >> 11) & 1).to(torch.int8).mul_(2).sub_(1)

    # -- accumulation --------------------------------------------------------------------------------

    def _hash_span(self, start: int, stop: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(start, stop, dtype=torch.int64, device=device)
        return self.bins(idx).to(torch.int32), self.signs(idx)

    def _plan(self, offset: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = (offset, n, torch.device(device))
        plan = self._plans.get(key)
        if plan is None and self._planned + n <= self._plan_limit:
            spans = [(offset + s, offset + min(n, s + CHUNK)) for s in range(0, n, CHUNK)]
            parts = [self._hash_span(a, b, device) for a, b in spans]
            plan = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            self._plans[key] = plan
            self._planned += n
        return plan

    def add_rows(self, acc: torch.Tensor, offset: int, values: torch.Tensor) -> None:
        """acc [B, K] += the sketches of values [B, n], placed at coordinates offset .. offset + n - 1."""
        n = values.shape[-1]
        if offset < 0 or offset + n > self.dim:
            raise ValueError(f"sketch: span [{offset}, {offset + n}) is outside [0, {self.dim})")
        if n == 0:
            return
        plan = self._plan(offset, n, values.device)
        # Chunked even with a plan: values are upcast to float32 a chunk at a time, not all at once.
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            if plan is not None:
                bins, signs = plan[0][s:e], plan[1][s:e]
            else:
                bins, signs = self._hash_span(offset + s, offset + e, values.device)
            acc.index_add_(1, bins, values[:, s:e].to(acc.dtype) * signs)

    def add(self, acc: torch.Tensor, offset: int, values: torch.Tensor) -> None:
        """acc [K] += the sketch of the flat tensor ``values`` placed at coordinates offset .. offset + n - 1."""
        self.add_rows(acc.unsqueeze(0), offset, values.reshape(1, -1))

    def zeros(self, *lead: int, device=None) -> torch.Tensor:
        return torch.zeros(*lead, self.k, dtype=torch.float32, device=device)

    def sketch(self, flat: torch.Tensor) -> torch.Tensor:
        """The [K] sketch of a whole flat vector of ``dim`` values."""
        if flat.numel() != self.dim:
            raise ValueError(f"sketch: got {flat.numel()} values, the config says dim={self.dim}")
        acc = self.zeros(device=flat.device)
        self.add(acc, 0, flat)
        return acc


def nest(sketch, k_small: int):
    """The k_small-bin sketch (same dim, seed and flags) from a [..., K] one: sums of K/k_small adjacent bins.

    Works on torch tensors and numpy arrays; upcast float16 caches first, or the sums stay in float16.
    """
    k = sketch.shape[-1]
    if k_small < 1 or k % k_small:
        raise UserError(f"sketch: k={k_small} does not divide the stored k={k}; pick a divisor of {k}")
    return sketch.reshape(*sketch.shape[:-1], k_small, k // k_small).sum(-1)
