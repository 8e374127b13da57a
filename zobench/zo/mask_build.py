"""Build a mask for a method, with its calibration data and an on-disk cache.

The cache key covers everything the mask depends on: a fingerprint of the weights in scope, the method,
density, scope, top-k mode, seed and, for gradient masks, the corpus file and its sampling. Files are
safetensors (indices per tensor) with the mask's facts (mass fraction, build time) in the metadata, written
to a temporary file and renamed so a killed run never leaves a torn mask.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zobench.data.calibration import corpus_batches, find_corpus
from zobench.errors import UserError
from zobench.zo import masks as M

@dataclass
class MaskSpec:
    method: str
    density: float
    scope: str = "linear"
    per_tensor: bool = False
    seed: int = 0
    calib_path: str | None = None      # gradient masks on a corpus ("sensitive")
    calib_sequences: int = 16
    calib_length: int = 256
    extra_key: dict = field(default_factory=dict)  # e.g. the task sample for task_grad


def weights_fingerprint(params) -> str:
    h = hashlib.sha256()
    for name, p in params:
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    ids = input_ids.to(model.device)
    return model(input_ids=ids, labels=ids).loss


class MaskCache:
    def __init__(self, root: Path):
        self.root = Path(root) / "masks"

    def key(self, spec: MaskSpec, fingerprint: str, corpus_key: str | None) -> str:
        d = dict(spec.__dict__, calib_path=corpus_key, weights=fingerprint)
        if spec.method not in ("sensitive",):
            d.pop("calib_sequences"), d.pop("calib_length")
        if spec.method != "random":
            d.pop("seed")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def load(self, key: str):
        from safetensors.torch import safe_open

        path = self.root / f"{key}.safetensors"
        if not path.exists():
            return None
        with safe_open(str(path), "pt") as f:
            mask = {n: f.get_tensor(n).long() for n in f.keys()}
            info = json.loads(f.metadata().get("info", "{}"))
        return mask, info

    def save(self, key: str, mask: dict[str, torch.Tensor], info: dict) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{key}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file({n: i.to(torch.int32 if i.max() < 2**31 else torch.int64).contiguous()
                       for n, i in mask.items()}, tmp, metadata={"info": json.dumps(info)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path


def build_mask(spec: MaskSpec, model, tokenizer, params, cache_root: Path | None = None,
               data_dir: str | None = None, task_batches=None, task_loss=None, vocab_size=None):
    """Return ``(mask, info)``; ``info`` has the obtained density, mass fraction, build time and cache hit."""
    if spec.method not in M.MASK_METHODS:
        raise UserError(f"unknown mask method '{spec.method}' (expected one of: {', '.join(M.MASK_METHODS)})")
    corpus = find_corpus(spec.calib_path, data_dir) if spec.method == "sensitive" else None
    corpus_key = corpus.key if corpus else None
    cache = MaskCache(cache_root) if cache_root else None
    key = cache.key(spec, weights_fingerprint(params), corpus_key) if cache else None
    if cache:
        hit = cache.load(key)
        if hit is not None:
            mask, info = hit
            return mask, dict(info, mask_cache_hit=True)

    start = time.perf_counter()
    info: dict = {}
    if spec.method == "random":
        mask = M.random_mask(params, spec.density, spec.seed)
    elif spec.method == "magnitude":
        mask = M.magnitude_mask(params, spec.density, spec.per_tensor)
    else:
        if spec.method == "sensitive":
            batches, loss = corpus_batches(corpus, tokenizer, spec.calib_sequences, spec.calib_length,
                                           vocab_size), lm_loss
            info["calib_corpus"] = corpus.describe()
        else:
            if task_batches is None:
                raise UserError("task_grad masks need the task's training batches")
            batches, loss = task_batches, task_loss
        scores = M.squared_gradients(model, params, batches, loss)
        mask = M.topk_mask(scores.items(), spec.density, spec.per_tensor)
        info["sqgrad_mass_frac"] = M.mass_fraction(scores, mask)
        del scores
    info.update(M.mask_summary(mask, params))
    info["mask_build_s"] = time.perf_counter() - start
    if cache:
        try:
            cache.save(key, mask, info)
        except OSError as e:  # a full or read-only cache: the mask is built, only not kept for next time
            info = dict(info, cache_warning=f"mask not cached in {cache.root}: {e.strerror or e}")
    return mask, dict(info, mask_cache_hit=False)
