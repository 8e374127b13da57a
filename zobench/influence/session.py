"""What caching and retrieval share: the model (plus its LoRA adapter), the gradient scope, the sketch.

``InfluenceSpec`` is everything that decides a cached sketch; its ``meta()`` is written beside the cache
and compared before reuse, so a query can never be scored against sketches of another model, scope,
K, sketch seed or normalization. ``Session`` rebuilds the identical projector from that spec (seed and config,
no pickle) in whichever process needs it: the caching workers and the query.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from zobench.errors import UserError
from zobench.influence.data import collate, encode, format_prompt, response_loss
from zobench.influence.grads import SCOPES, GradientStreamer, resolve_scope
from zobench.influence.sketch import SketchConfig, Sketcher

DEFAULT_K = 1 << 16


@dataclass
class InfluenceSpec:
    model: str = "smollm2"
    adapter: str | None = None      # a peft LoRA adapter directory (the fine-tuned model)
    delta: str | None = None        # or a result kept by `zobench train/influence train --save` (zobench.cell.delta)
    dtype: str = "float32"
    scope: str = "lora"
    k: int = DEFAULT_K
    sketch_seed: int = 0            # the sketch's seed (permutation and signs)
    normalize: bool = True          # layer-wise unit norm before sketching
    permute: bool = True
    max_length: int = 256
    density: float = 1e-3           # scope 'sensitive': the mask's density
    calib_sequences: int = 16       # scope 'sensitive': the mask's calibration sample
    calib_length: int = 256
    data_dir: str | None = None     # where c4/ is found for the sensitive mask

    @classmethod
    def from_dict(cls, d: dict, where: str) -> InfluenceSpec:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise UserError(f"{where}: unknown key '{key}' (expected one of: {', '.join(sorted(known))})")
        spec = cls(**d)
        if spec.scope == "full":
            raise UserError(f"{where}: key 'scope': 'full' is called 'all' (every parameter), as everywhere else")
        if spec.scope not in SCOPES:
            raise UserError(f"{where}: key 'scope': expected one of {', '.join(SCOPES)}, got '{spec.scope}'")
        if not isinstance(spec.k, int) or spec.k < 1:
            raise UserError(f"{where}: key 'k': expected a positive integer, got {spec.k!r}")
        if spec.adapter and not (Path(spec.adapter) / "adapter_config.json").is_file():
            raise UserError(f"{where}: key 'adapter': {spec.adapter} has no adapter_config.json")
        if spec.delta:
            if spec.adapter:
                raise UserError(f"{where}: give an adapter or a delta, not both")
            from zobench.cell.delta import read

            kind = read(spec.delta)["kind"]
            if kind == "trajectory":
                raise UserError(f"{where}: key 'delta': {spec.delta} is a dense ZO trajectory; influence takes "
                                f"sparse, LoRA or first-order deltas")
        return spec

    def meta(self) -> dict:
        """The keys a cache must match (paths reduced to content hashes, so a moved adapter still matches)."""
        d = asdict(self)
        d.pop("data_dir")
        if self.adapter:
            d["adapter"] = _dir_hash(Path(self.adapter))
        if self.delta:
            d["delta"] = _dir_hash(Path(self.delta))
        else:
            d.pop("delta")  # caches made before deltas existed still match
        if self.scope != "sensitive":
            for key in ("density", "calib_sequences", "calib_length"):
                d.pop(key)
        return d


def _dir_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


class Session:
    """A loaded model with its scope, gradient streamer and sketcher, built from an ``InfluenceSpec``."""

    def __init__(self, spec: InfluenceSpec, device: str = "cpu", with_mask: bool = False):
        from zobench.models import load_model

        self.spec = spec
        self.loaded = load_model(spec.model, dtype=spec.dtype, device=device)
        self.tokenizer = self.loaded.tokenizer
        self.adapter = spec.adapter
        delta_mask = self._apply_delta() if spec.delta else None
        # The mask is the plain model's (as the ZO part computes it), before any adapter is attached; a
        # sparse delta's own indices when one is loaded: the subspace that was trained.
        self.mask = None
        if spec.scope == "sensitive" or with_mask:
            self.mask = delta_mask if delta_mask is not None else self._sensitive_mask()
        if self.adapter:
            from zobench.influence.poison import load_adapter

            load_adapter(self.loaded, self.adapter)
        self.model = self.loaded.model
        self.model.eval()
        self.scope = resolve_scope(self.model, spec.scope, self.mask)
        self.streamer = GradientStreamer(self.model, self.scope, normalize=spec.normalize)
        self.sketcher = self.sketcher_for(spec, self.scope.dim)

    def _apply_delta(self) -> dict | None:
        """Load the delta onto the base (refused on another base); a sparse delta's indices, else None.
        A LoRA delta's adapter is attached after the mask is computed, as ``adapter`` is."""
        from zobench.cell import delta as D

        path = Path(self.spec.delta)
        meta = D.read(path)
        D.check_base(meta, path, self.loaded.model)
        if meta["kind"] == "sparse":
            mask, values = D.sparse_parts(path)
            D.write_sparse(self.loaded.model, mask, values)
            return mask
        if meta["kind"] == "lora":
            self.adapter = str(path / "adapter")
        else:
            D.write_tensors(self.loaded.model, path)
        return None

    @staticmethod
    def sketcher_for(spec: InfluenceSpec, dim: int) -> Sketcher:
        return Sketcher(SketchConfig(dim=dim, k=min(spec.k, dim), seed=spec.sketch_seed, permute=spec.permute))

    def _sensitive_mask(self) -> dict:
        """SensZOQ's mask: the top ``density`` squared gradients on the C4 sample, cached on disk where the
        trainer's masks are (the same key, so the two share it)."""
        from zobench.methods.masked import sensitive_mask
        from zobench.models.load import cache_dir
        from zobench.zo.masks import scoped_params

        base = self.loaded.model
        mask, _ = sensitive_mask(base, self.tokenizer, scoped_params(base, "linear"), self.spec.density,
                                 self.spec.calib_sequences, self.spec.calib_length, self.spec.data_dir, cache_dir(),
                                 self.loaded.vocab_size if self.loaded.random_weights else None)
        for p in base.parameters():
            p.grad = None
        return mask

    def encode(self, example: dict) -> dict:
        """A training example as cached: prompt and response cut to the spec's ``max_length``."""
        return encode(self.tokenizer, format_prompt(example), example["output"], self.spec.max_length)

    def encode_query(self, prompt_example: dict, generation: str) -> dict:
        """A query: the prompt and the generation it answered, cut only at the model's context.

        ``max_length`` bounds what caching costs; it does not apply here. A query cut to it loses the
        end of a long prompt ("### Response:" with it), and its loss is then over tokens the model never
        generated from that context: such queries scored at chance (no poisoned example in their top
        100) while every other triggered query found 89 or more of the 100.
        """
        context = getattr(self.model.config, "max_position_embeddings", None) or 1 << 20
        return encode(self.tokenizer, format_prompt(prompt_example), generation, max(context, self.spec.max_length))

    def _loss_fn(self, enc: dict, token_weights: torch.Tensor | None = None):
        ids, attn, labels = collate([enc], self.tokenizer.pad_token_id)
        return lambda: response_loss(self.model, ids, attn, labels, token_weights)

    def sketch(self, enc: dict, token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(the example's sketch [K], its loss)."""
        acc = self.sketcher.zeros()
        loss = self.streamer.backward(self._loss_fn(enc, token_weights),
                                      lambda off, v: self.sketcher.add(acc, off, v))
        return acc, loss

    def exact(self, enc: dict, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The whole normalized scoped gradient (for fidelity checks on small scopes)."""
        return self.streamer.flat(self._loss_fn(enc, token_weights))
