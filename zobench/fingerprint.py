"""A cheap identity of model weights: names, shapes, dtypes and the first values of every tensor.

What the caches and kept results of one model's weights are keyed on: masks (``zo.mask_build``), quantized
layers (``quant.base``) and deltas (``cell.delta``). It reads the tensors it is given and imports no
torch, so each of those layers takes it from the ground instead of from one another.
"""

from __future__ import annotations

import hashlib


def weights_fingerprint(params) -> str:
    """``params``: (name, tensor) pairs, in order."""
    return fingerprint_of_heads((name, tuple(p.shape), p.dtype, head(p)) for name, p in params)


def head(p):
    """What the fingerprint reads of a tensor's values: its first 1,024."""
    return p.detach().reshape(-1)[:1024]


def fingerprint_of_heads(items) -> str:
    """``weights_fingerprint`` from (name, shape, dtype, head) kept as each tensor went by: the identity of a
    model whose layers were quantized as they arrived (``cell.pipeline``), equal to the float model's."""
    h = hashlib.sha256()
    for name, shape, dtype, values in items:
        h.update(f"{name}{tuple(shape)}{dtype}".encode())
        h.update(values.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def scales_fingerprint(layers) -> str:
    """``layers``: (layer name, its quantization scales) pairs, in any order: the identity of the scales a QZO
    delta was trained from, which its load checks (a scale means something only beside its own codes)."""
    return weights_fingerprint(sorted(layers, key=lambda item: item[0]))
