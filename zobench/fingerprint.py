"""A cheap identity of model weights: names, shapes, dtypes and the first values of every tensor.

What the caches and kept results of one model's weights are keyed on: masks (``zo.mask_build``), quantized
layers (``quant.base``) and deltas (``cell.delta``). It reads the tensors it is given and imports no
torch, so each of those layers takes it from the ground instead of from one another.
"""

from __future__ import annotations

import hashlib


def weights_fingerprint(params) -> str:
    """``params``: (name, tensor) pairs, in order."""
    h = hashlib.sha256()
    for name, p in params:
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def scales_fingerprint(layers) -> str:
    """``layers``: (layer name, its quantization scales) pairs, in any order: the identity of the scales a QZO
    delta was trained from, which its load checks (a scale means something only beside its own codes)."""
    return weights_fingerprint(sorted(layers, key=lambda item: item[0]))
