"""Masks on disk: build a method's mask once per (weights, settings) and reuse it.

The cache key covers everything a mask depends on: a fingerprint of the weights in scope, the method,
density, scope, top-k mode, the seed (random masks) and, for masks computed on a calibration corpus, the
corpus's contents and its sampling. Files are safetensors (indices per tensor) with the mask's facts
(mass fraction, corpus, build time) in the metadata, written to a temporary file and renamed, so a
killed run never leaves a torn mask. How a mask is chosen is the method's business
(``zobench.methods.masked``); this module only caches.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import safe_open, save

from zobench.files import atomic_write, parse_json
from zobench.fingerprint import weights_fingerprint
from zobench.outdirs import build_lock
from zobench.zo import masks as M


@dataclass
class MaskSpec:
    method: str
    density: float
    scope: str = "linear"
    per_tensor: bool = False
    seed: int | None = None            # random masks only
    calib_path: str | None = None
    calib_sequences: int = 16
    calib_length: int = 256
    extra_key: dict = field(default_factory=dict)  # e.g. the task sample for task_grad
    corpus_key: str | None = None      # the calibration corpus's contents, for masks computed on one


def lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    ids = input_ids.to(model.device)
    return model(input_ids=ids, labels=ids).loss


# The facts of a build a cached mask keeps (``cached_mask``'s info): a file's other keys are not taken into a
# record, and its counts are recomputed from the indices.
KEPT_INFO = {"sqgrad_mass_frac": (float, int), "calib_corpus": (dict,), "mask_route": (str,),
             "mask_build_s": (float, int)}


class MaskCache:
    def __init__(self, root: Path):
        self.root = Path(root) / "masks"

    def key(self, spec: MaskSpec, fingerprint: str) -> str:
        d = dict(spec.__dict__, weights=fingerprint)
        d["calib_path"] = d.pop("corpus_key")  # the corpus's contents, not where the file happens to be
        if spec.corpus_key is None:
            d.pop("calib_sequences"), d.pop("calib_length")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def load(self, key: str, sizes: dict[str, int] | None = None):
        """``(mask, info)`` kept under ``key``, or None: none kept, or a file that is not a mask of these
        parameters (``sizes``: name -> number of values; a cache is data, and a damaged or planted file must
        not index past a weight), which is then built again and replaces it."""
        path = self.root / f"{key}.safetensors"
        if not path.is_file() or path.is_symlink():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                mask = {n: f.get_tensor(n).long() for n in f.keys()}
                info = parse_json((f.metadata() or {}).get("info", "{}"), str(path))
        except Exception:  # safetensors' own errors are not one class: any unreadable file is a miss
            return None
        if not isinstance(info, dict) or (sizes is not None and not _fits(mask, sizes)):
            return None
        # what a build said of the mask, each of its type; the rest (the counts) is recomputed from the mask
        return mask, {k: v for k, v in info.items() if k in KEPT_INFO and type(v) in KEPT_INFO[k]
                      and (not isinstance(v, dict) or all(isinstance(x, str) for x in (*v, *v.values())))}

    def save(self, key: str, mask: dict[str, torch.Tensor], info: dict) -> Path:
        data = save({n: i.to(torch.int32 if i.max() < 2**31 else torch.int64).contiguous() for n, i in mask.items()},
                    metadata={"info": json.dumps(info)})
        return atomic_write(self.root / f"{key}.safetensors", data, "mask cache")  # whole or not at all


def _fits(mask: dict[str, torch.Tensor], sizes: dict[str, int]) -> bool:
    """Whether ``mask`` is one over these parameters: each tensor a parameter's, its indices 1-D, strictly
    increasing and within it (``masks``: sorted flat indices)."""
    for name, idx in mask.items():
        if name not in sizes or idx.dim() != 1:
            return False
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= sizes[name] or bool((idx[1:] <= idx[:-1]).any())):
            return False
    return True


def cached_mask(spec: MaskSpec, params, make: Callable[[], tuple[dict, dict]], cache_root: Path | None = None,
                fingerprint: str | None = None):
    """``(mask, info)``: from the cache, else ``make()`` (then cached). ``info`` has the obtained density,
    the build time, whether the cache hit, and what ``make`` reported (mass fraction, corpus). ``fingerprint``:
    the weights' identity where ``params`` cannot be read (a streamed model's; else computed from them)."""
    cache = MaskCache(cache_root) if cache_root else None
    if cache is None:
        return _build(params, make, None, None)
    key = cache.key(spec, fingerprint or weights_fingerprint(params))
    with build_lock(cache.root / key):  # a cell that needs the mask another is building waits for it
        hit = cache.load(key, {n: p.numel() for n, p in params})
        if hit is not None:
            mask, info = hit
            return mask, dict(info, **M.mask_summary(mask, params), mask_cache_hit=True)
        return _build(params, make, cache, key)


def _build(params, make, cache: MaskCache | None, key: str | None):
    start = time.perf_counter()
    mask, info = make()
    info = dict(info, **M.mask_summary(mask, params), mask_build_s=time.perf_counter() - start)
    if cache:
        try:
            cache.save(key, mask, info)
        except OSError as e:  # a full or read-only cache: the mask is built, only not kept for next time
            info = dict(info, cache_warning=f"mask not cached in {cache.root}: {e.strerror or e}")
    return mask, dict(info, mask_cache_hit=False)
