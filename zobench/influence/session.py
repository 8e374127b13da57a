"""What caching and retrieval share: the model (plus its LoRA adapter), the gradient scope, the sketch.

``InfluenceSpec`` (``zobench.influence.spec``) is everything that decides a cached sketch. ``Session``
rebuilds the identical projector from that spec (seed and config, no pickle) in whichever process needs
it: the caching workers and the query.
"""

from __future__ import annotations

import torch

from zobench.cell import delta as D
from zobench.cell import delta_tensors as DT
from zobench.cell.delta_check import check_adapter
from zobench.errors import UserError
from zobench.files import cache_dir
from zobench.influence.grads import GradientStreamer, resolve_scope
from zobench.influence.sketch import SketchConfig, Sketcher
from zobench.influence.spec import InfluenceSpec
from zobench.methods.masked import sensitive_mask
from zobench.models import load_model
from zobench.models.lora import load_adapter
from zobench.tasks.instruction import format_prompt
from zobench.tasks.responses import collate, encode, response_loss
from zobench.zo.masks import scoped_params


class Session:
    """A loaded model with its scope, gradient streamer and sketcher, built from an ``InfluenceSpec``."""

    def __init__(self, spec: InfluenceSpec, device: str = "cpu", with_mask: bool = False):
        self.spec = spec
        links = D.chain(spec.delta) if spec.delta else []
        self.loaded = load_model(spec.model, dtype=spec.dtype, seed=_base_seed(links), device=device)
        self.tokenizer = self.loaded.tokenizer
        self.adapter = spec.adapter
        delta_mask = self._apply_delta(links) if links else None
        # The mask is the plain model's (as the ZO part computes it), before any adapter is attached; a
        # sparse delta's own indices when one is loaded: the subspace that was trained.
        self.mask = None
        if spec.scope == "sensitive" or with_mask:
            self.mask = delta_mask if delta_mask is not None else self._sensitive_mask()
        if self.adapter:  # (its config checked with the spec or the delta: check_adapter)
            DT.check_adapter_weights(self.adapter)
            load_adapter(self.loaded, self.adapter)
        self.model = self.loaded.model
        self.model.eval()
        self.scope = resolve_scope(self.model, spec.scope, self.mask)
        self.streamer = GradientStreamer(self.model, self.scope, normalize=spec.normalize)
        self.sketcher = self.sketcher_for(spec, self.scope.dim)

    def _apply_delta(self, links: list) -> dict | None:
        """Load the delta's ``links`` (``delta.chain``: its ancestors first) onto the base, refused on another
        base; the last sparse link's indices, else None. A LoRA delta's adapter is attached after the mask is
        computed, as ``adapter`` is."""
        DT.check_base(links[0][1], links[0][0], self.loaded.model)
        mask = None
        for i, (path, meta) in enumerate(links):
            if meta["kind"] == "sparse":
                mask, values = DT.sparse_parts(path)
                DT.write_sparse(self.loaded.model, mask, values, str(path / D.TENSORS))
            elif meta["kind"] == "lora" and i == len(links) - 1:
                check_adapter(path / "adapter")
                self.adapter = str(path / "adapter")
            elif meta["kind"] == "tensors":
                DT.write_tensors(self.loaded.model, path)
            else:
                raise UserError(f"{path}: a {meta['kind']} delta inside a chain; influence takes sparse, LoRA or "
                                f"first-order deltas (a LoRA delta only as the last link)")
        return mask if links[-1][1]["kind"] == "sparse" else None

    @staticmethod
    def sketcher_for(spec: InfluenceSpec, dim: int) -> Sketcher:
        return Sketcher(SketchConfig(dim=dim, k=min(spec.k, dim), seed=spec.sketch_seed, permute=spec.permute))

    def _sensitive_mask(self) -> dict:
        """SensZOQ's mask: the top ``density`` squared gradients on the C4 sample, cached on disk where the
        trainer's masks are (the same key, so the two share it)."""
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


def sketch_examples(session: Session, examples: list[dict]) -> tuple[torch.Tensor, int]:
    """The sketched gradients of ``examples`` ([len, k], in order) and how many tokens they had; shared by
    the local cache build (``influence.cache``) and the Ray actors (``influence.ray_cache``)."""
    tokens, values = 0, []
    for example in examples:
        enc = session.encode(example)
        sk, _ = session.sketch(enc)
        tokens += int(enc["input_ids"].numel())
        values.append(sk)
    return torch.stack(values), tokens


def _base_seed(links: list) -> int:
    """The seed a random-weight base is drawn with: the one of the cell that trained the delta's root link on
    it (a cell draws its random weights with its seed; ``delta.read`` has checked the config as a cell's), 0
    without a delta."""
    return links[0][1]["config"].get("seed", 0) if links else 0
