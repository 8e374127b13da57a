"""The sparse ZO methods: a static mask picks ``density`` of the scope, and only those entries move.

    random      exactly round(density * N) entries, uniform over the scope (seeded)
    sensitive   the largest squared gradients on pre-training-like text (SensZOQ, arXiv 2406.02913):
                they transfer across downstream tasks, so the mask is built once, before any task
    magnitude   the largest |w| (a baseline)
    task_grad   the largest squared gradients of the task loss before training (a baseline)

The selected entries are held as flat indices plus a float32 master copy, and z has length nnz
(``zo.trainable.SparseTrainable``): a 0.1% mask costs 0.1% of the perturbation work. On quantized
weights the entries are taken out of the weights before quantization and trained beside the
quantized layers (``quant.sparse``). Masks are cached on disk (``zo.mask_build``).
"""

from __future__ import annotations

from dataclasses import replace

from zobench.data.calibration import corpus_batches, find_corpus
from zobench.methods.base import Method, Price, PriceInputs, register
from zobench.methods.common import z_extra, zo_stepper
from zobench.models import layerwise
from zobench.quant import get_backend
from zobench.zo import masks as M
from zobench.zo.mask_build import MaskSpec, cached_mask, lm_loss
from zobench.zo.sizes import OPT_STATE_VALUES
from zobench.zo.trainable import SparseTrainable


class MaskMethod(Method):
    """Shared by the mask methods (declared with ``needs_mask`` in ``spec.catalog``); each subclass says how
    it picks its entries (``select``)."""

    seeded = False  # the mask depends on the run's seed (random masks)

    def mask_spec(self, run):
        cfg = run.cfg
        return MaskSpec(self.name, cfg.density, cfg.resolved_scope, cfg.per_tensor,
                        cfg.seed if self.seeded else None, cfg.calib_path, cfg.calib_sequences, cfg.calib_length,
                        self.extra_key(run))

    def extra_key(self, run) -> dict:
        """What else the mask depends on (beyond the weights and the settings), for its cache key."""
        return {}

    def select(self, run) -> tuple[dict, dict]:
        """``(mask, info)``: the chosen flat indices per tensor of ``run.params``."""
        raise NotImplementedError

    def build_mask(self, run):
        return cached_mask(self.mask_spec(run), run.params, lambda: self.select(run), run.cache_root,
                           run.params_fingerprint())

    def build_stepper(self, run):
        direction, generator = run.cfg.direction, run.cfg.generator
        if run.vectors is not None:  # quantized: the sparse values beside the quantized layers
            return zo_stepper(run, SparseTrainable.of_vectors(run.vectors, direction, generator))
        return zo_stepper(run, SparseTrainable(run.params, run.mask, direction, generator))

    def price(self, inputs: PriceInputs) -> Price:
        return sparse_price(inputs)


def sparse_price(inputs: PriceInputs) -> Price:
    cfg, arch, db = inputs.cfg, inputs.arch, inputs.dtype_bytes
    tensors = inputs.scope_sizes
    if cfg.per_tensor:
        nnz = sum(int(round(cfg.density * n)) for n in tensors)
    else:
        nnz = int(round(cfg.density * sum(tensors)))
    quantized = inputs.storage is not None
    # The mask's int64 flat indices stay referenced by the pipeline (and are the trainable's indices on
    # the plain path); the float32 master is SparseTrainable's copy of the selected values.
    idx = 8 if inputs.device == "cpu" or not quantized else 0
    trainable, per_layer = nnz * (idx + 4), 0.0
    merge = False
    if quantized:
        # Dense-and-sparse (quant.sparse): the live values in the model dtype beside the quantized layer
        # and their int32 flat indices; where S is not merged into the dequantized weight
        # (Backend.merges_on), also the CSR of S^T: int32 column indices, int32 positions of its nonzeros
        # in the values, and (in + 1) int32 row pointers.
        merge = get_backend(cfg.quant).merges_on(inputs.device)
        layers = [(o, i) for o, i in arch.linears if cfg.density * o * i >= 1]
        trainable += nnz * (db + 4) + (0 if merge else nnz * 8 + sum(4 * (i + 1) for _, i in layers))
        per_layer = nnz / max(len(layers), 1)
    # apply: z, master + scale*z and its cast to the weights' dtype; update: the estimate and one z at a
    # time (q seeds are summed in turn), plus Adam's denominator.
    update = nnz * (4 + z_extra(cfg) + 4 + db + (8 if cfg.optimizer == "adam" else 0))
    return Price(trainable=trainable, optimizer=nnz * OPT_STATE_VALUES[cfg.optimizer] * 4, update=update,
                 nnz=nnz, sparse_delta=quantized and not merge, nnz_per_layer=per_layer)


@register
class Random(MaskMethod):
    name = "random"
    seeded = True

    def mask_streams(self, cfg) -> bool:
        return True  # the indices depend on the tensors' sizes only

    def select(self, run):
        return M.random_mask(run.params, run.cfg.density, run.cfg.seed), {}


@register
class Sensitive(MaskMethod):
    name = "sensitive"

    def mask_spec(self, run):
        return replace(super().mask_spec(run), corpus_key=self._corpus(run).key)

    def _corpus(self, run):
        return find_corpus(run.cfg.calib_path, run.cfg.data_dir)

    def mask_streams(self, cfg) -> bool:
        return cfg.resolved_scope == "linear"  # the block linears, drawn block by block (models.layerwise)

    def select(self, run):
        cfg, deferred = run.cfg, run.loaded.deferred
        if deferred is not None and not layerwise.supports(run.model):
            deferred.arrive_all(run.model)  # an architecture not run block by block: made whole
            run.loaded.deferred = deferred = None
        if deferred is None:
            mask, info = sensitive_select(run.model, run.tokenizer, run.params, self._corpus(run), cfg.density,
                                          cfg.per_tensor, cfg.calib_sequences, cfg.calib_length, run.vocab)
            return mask, dict(info, mask_route="whole model")
        corpus = self._corpus(run)
        batches = corpus_batches(corpus, run.tokenizer, cfg.calib_sequences, cfg.calib_length, run.vocab)
        scores = layerwise.squared_gradients(run.model, deferred, batches, [n for n, _ in run.params])
        mass: dict = {}
        chosen = M.topk_mask(scores, cfg.density, cfg.per_tensor, sum(p.numel() for _, p in run.params), mass)
        mask = {n: chosen[n] for n, _ in run.params if n in chosen}  # the model's order, as the whole-model pass
        frac = mass["covered"] / mass["total"] if mass["total"] else 0.0
        return mask, {"sqgrad_mass_frac": frac, "calib_corpus": corpus.describe(), "mask_route": "layer by layer"}


def sensitive_select(model, tokenizer, params, corpus, density, per_tensor, n_seq, seq_len, vocab):
    """SensZOQ's mask: top ``density`` of the summed squared gradients of the LM loss on ``corpus``."""
    batches = corpus_batches(corpus, tokenizer, n_seq, seq_len, vocab)
    scores = M.squared_gradients(model, params, batches, lm_loss)
    mask = M.topk_mask(scores.items(), density, per_tensor)
    return mask, {"sqgrad_mass_frac": M.mass_fraction(scores, mask), "calib_corpus": corpus.describe()}


def sensitive_mask(model, tokenizer, params, density, n_seq, seq_len, data_dir=None, cache_root=None,
                   vocab=None, calib_path=None):
    """The sensitive mask outside a suite cell (influence's ``sensitive`` scope), cached like the cell's."""
    corpus = find_corpus(calib_path, data_dir)
    spec = MaskSpec("sensitive", density, "linear", False, None, calib_path, n_seq, seq_len, corpus_key=corpus.key)
    return cached_mask(spec, params, lambda: sensitive_select(model, tokenizer, params, corpus, density, False,
                                                              n_seq, seq_len, vocab), cache_root)


@register
class Magnitude(MaskMethod):
    name = "magnitude"

    def select(self, run):
        return M.magnitude_mask(run.params, run.cfg.density, run.cfg.per_tensor), {}


@register
class TaskGrad(MaskMethod):
    name = "task_grad"

    def extra_key(self, run) -> dict:
        return {"task": run.cfg.task, "n_train": run.cfg.n_train}

    def select(self, run):
        cfg = run.cfg
        stream = run.batches(seed=cfg.seed + 1)
        batches = [run.encode(next(stream)) for _ in range(max(1, cfg.calib_sequences // cfg.batch_size))]
        scores = M.squared_gradients(run.model, run.params, batches, run.loss_fn)
        mask = M.topk_mask(scores.items(), cfg.density, cfg.per_tensor)
        return mask, {"sqgrad_mass_frac": M.mass_fraction(scores, mask)}
