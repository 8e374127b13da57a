"""One cell as a pipeline of measured phases: load -> mask -> quantize -> evaluate -> train -> evaluate.

    run_cell(cfg) -> CellRecord

Each step is a short method of ``Pipeline`` and each measured phase gets its own wall time and peak
memory (reset at its start), so the mask's gradient pass, for example, does not hide inside the training
peak. A streamed cell (``Pipeline.streams``: quantized layer by layer) loads the tensors that stay float and
leaves the block linears on the meta device (a random model's drawn when asked for, a local checkpoint's
read from its shards); its mask, if it has one, is computed block by block (``models.layerwise``), and its
quantize phase makes each linear and quantizes it before the next, so the float model never exists whole.
What differs between methods is asked of the method (``zobench.methods``): whether it builds a mask, whether
it runs beside quantized weights, how it steps. ``Run`` is what a method sees of the cell.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import torch
from transformers.utils import logging as hf_logging

from zobench.cell import checkpoint, resume
from zobench.cell.delta_tensors import base_fingerprint
from zobench.cell.keep import apply_quantized, load_into, save_from
from zobench.cell.measures import Metrics
from zobench.cell.predictions import Predictions
from zobench.cell.record import CellRecord
from zobench.cell.run import Run, quantize_streamed, resolve_device
from zobench.cell.selection import DevSelection
from zobench.cell.timing import ForwardReference, Phases, StepTiming, warm_shapes, zo_passes
from zobench.errors import Unsupported, UserError
from zobench.files import cache_dir
from zobench.methods import get_method
from zobench.methods.base import streams
from zobench.models import load_model
from zobench.quant import QuantContext, get_backend, quantize_model
from zobench.quant.sparse import SparseDelta, pack_values
from zobench.spec.config import CellConfig
from zobench.spec.matrix import cell_id
from zobench.tasks import Splits, get_task, logits
from zobench.zo import fused
from zobench.zo.drift import measure_restore_drift
from zobench.zo.masks import linear_layers, scoped_params
from zobench.zo.trainer import replay, train_steps

Progress = Callable[[dict], None]


class Pipeline:
    """The phases of one cell; ``run()`` returns its record (status "ok") or raises."""

    def __init__(self, cfg: CellConfig, progress: Progress | None = None, splits: Splits | None = None):
        self.cfg, self.notify = cfg, progress or (lambda _: None)
        self.given = splits  # a caller's own examples (influence's poisoned rows) instead of the task's sample
        self.method = get_method(cfg.method)
        self.info = cfg.method_info  # what the method declares (spec.catalog): family, mask, quantized
        self.device = resolve_device(cfg.device)
        self.record = CellRecord(cell_id="", config=cfg.to_dict(), device=self.device)
        self.metrics: Metrics = self.record.metrics
        self.phase = Phases(self.device, self.record.phases)
        self.backend = None
        self.run_state: Run | None = None
        self.stepper = self.trainable = self.selection = None
        self.base_fingerprint = None
        self.resumed = None  # a checkpoint this cell goes on from (zobench.cell.checkpoint)
        self.began = resume.clock()  # what its checkpoints say the cell spent counts from here
        # a delta chain's quantization scales (QZO) and codes (QuZO): written once quantized (cell.keep)
        self.pending_quantized: list = []
        self.predictions = Predictions(cfg.predictions)  # per-example, every evaluation

    def run(self) -> CellRecord:
        hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars would flood suite logs
        torch.manual_seed(self.cfg.seed)
        self.check_supported()
        self.sample_data()
        with self.phase("load"):
            self.load()
            if self.cfg.delta:
                self.metrics.set(delta=load_into(self))
        self.count_truncated()
        self.note_packing()
        if self.info.needs_mask and self.run_state.mask is None:
            with self.phase("mask"):
                self.build_mask()
        if self.backend is not None:
            with self.phase("quantize"):
                self.quantize()
                apply_quantized(self)
        self.load_checkpoint()
        # After masking and quantization: "before" is the model that training starts from.
        if self.resumed is not None and self.resumed.test_before is not None:
            self.metrics.set(test_before=self.resumed.test_before)
        else:
            self.evaluate("eval_before", "test_before", self.cfg.eval_before)
        self.train()
        self.evaluate("eval_after", "test_after", self.cfg.eval_after)
        self.select_best()
        self.record.predictions = self.predictions.write()
        if self.cfg.save:
            self.record.artifact = save_from(self, Path(self.cfg.save), self.cfg.overwrite)
        return self.record

    # -- set-up ------------------------------------------------------------------------------------
    def check_supported(self) -> None:
        """``Unsupported`` before anything loads: no CUDA device, or a method that cannot train beside
        quantized weights."""
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise Unsupported(f"needs a CUDA device (device={self.cfg.device}); this machine has none")
        if self.cfg.quant == "none":
            return

        self.backend = get_backend(self.cfg.quant)
        self.backend.check_available(self.device)
        if not self.backend.perturbable and not self.info.quantized:
            raise Unsupported(f"method '{self.cfg.method}' changes every weight, and {self.cfg.quant} weights are "
                              f"quantized codes that cannot move by eps*z; use a sparse method (random, "
                              f"sensitive), which trains 16/32-bit values beside the quantized layers")

    def sample_data(self) -> None:
        cfg = self.cfg
        task = get_task(cfg.task)
        splits = self.given or task.sample(cfg.data_dir, cfg.n_train, cfg.n_dev, cfg.n_test, cfg.seed, cfg.dev_from)
        self.metrics.set(n_train=len(splits.train), n_dev=len(splits.dev), n_test=len(splits.test))
        self.record.data_note = splits.note
        self.run_state = Run.of(cfg, self.device, task, splits, cache_root=cache_dir())

    def streams(self) -> bool:
        """Whether this cell's model is streamed (``methods.base.streams``)."""
        return streams(self.cfg, self.method, self.backend)

    def load(self) -> None:
        cfg, rec = self.cfg, self.record
        stream = self.streams()
        try:
            loaded = load_model(cfg.model, cfg.dtype, cfg.seed, cfg.trust_remote_code, self.device, stream)
        except UserError as e:
            if not cfg.model_fallback:
                raise
            rec.model_fallback_reason = str(e)
            loaded = load_model(cfg.model_fallback, cfg.dtype, cfg.seed, cfg.trust_remote_code, self.device,
                                stream)
        run = self.run_state
        run.loaded = loaded
        rec.model_source, rec.accuracy_meaningful = loaded.source, not loaded.random_weights
        self.metrics.set(model_numel=sum(p.numel() for p in loaded.model.parameters()))
        if loaded.init is not None:
            self.metrics.set(weights_init=loaded.init)

        # what a saved delta will require of its base (a streamed model's as if its deferred layers were drawn)
        self.base_fingerprint = (base_fingerprint(loaded.model) if loaded.deferred is None else
                                 loaded.deferred.fingerprint(loaded.model, loaded.model.named_parameters()))

        run.params = scoped_params(loaded.model, cfg.resolved_scope)
        if self.info.family == "zo" and not self.info.needs_mask and not self.info.needs_scales:  # dense ZO
            n = sum(p.numel() for _, p in run.params)
            self.metrics.set(mask_nnz=n, scope_numel=n, density_obtained=1.0)

    def count_truncated(self) -> None:
        """Truncated inputs per split into the record, and a warning for each split that has any: a cut
        input silently loses the start of its passage (MeZO at least logs "Exceed max length")."""

        run, counts = self.run_state, {}
        for name in ("train", "dev", "test"):
            examples = getattr(run.splits, name)
            counts[name] = run.count_truncated(examples, train=name == "train")
            if counts[name]:
                self.record.add_warning(f"max_length {self.cfg.max_length} truncates {counts[name]} of "
                                        f"{len(examples)} {name} examples (from the left); raise max_length "
                                        f"to keep them whole")
        self.metrics.set(truncated=dict(counts, max_length=self.cfg.max_length))

    def note_packing(self) -> None:
        """With ``pack`` set, whether this model takes packed rows; a model that cannot keeps padding, and
        the record says so (its timings are padded ones)."""

        if not self.cfg.pack:
            return
        model = self.run_state.model
        self.metrics.set(packed=logits.packs(model))
        if not logits.packs(model):
            kind = getattr(getattr(model, "config", None), "model_type", "?")
            self.record.add_warning(f"pack: {kind} models are not packed (packed: "
                                    f"{', '.join(logits.PACKED_MODEL_TYPES)}); its batches stay padded")

    def build_mask(self) -> None:
        run = self.run_state
        mask, info = self.method.build_mask(run)
        if "cache_warning" in info:
            info = dict(info)
            self.record.add_warning(info.pop("cache_warning"))
        run.mask = mask
        self.metrics.set(**info)
        if self.backend is None and run.loaded.deferred is not None:  # a float cell: its linears, now
            run.loaded.deferred.arrive_all(run.model)
            run.loaded.deferred = None
            run.params = scoped_params(run.model, self.cfg.resolved_scope)

    def quantize(self) -> None:
        cfg, run = self.cfg, self.run_state
        ctx = QuantContext(device=self.device, dtype=next(run.model.parameters()).dtype, tokenizer=run.tokenizer,
                           data_dir=cfg.data_dir, calib_path=cfg.calib_path, calib_sequences=cfg.calib_sequences,
                           calib_length=cfg.calib_length, vocab_size=run.vocab, seed=cfg.seed,
                           cache_dir=run.cache_root)
        # The float weights in run.params are about to be replaced by quantized layers: drop the references
        # first. Held, each replaced layer's float weight would stay alive to the end of the phase, and GPTQ
        # writes its quantized-dequantized weight into it (a fresh copy, where the checkpoint's was mapped):
        # SmolLM2's GPTQ quantize phase held 405 MiB more (results/bench/measurements.md).
        run.params = []
        if run.loaded.deferred is not None:  # streamed: each block linear drawn, then quantized before the next
            vectors = quantize_streamed(run, self.backend, ctx, run.mask)
            self.metrics.set(quant_streamed=True)
        else:
            vectors = quantize_model(run.model, self.backend, ctx, linear_layers(run.model), run.mask)
        vectors = pack_values(run.model, vectors)  # one buffer: a ZO pass writes them in one operation
        ways = sorted({m.way for m in run.model.modules() if isinstance(m, SparseDelta)})
        if ways:  # how the dense-and-sparse layers add their values (quant.sparse): merge, csr or gather
            ctx.info["sparse_way"] = ",".join(ways)
        if "cache_warning" in ctx.info:
            self.record.add_warning(ctx.info.pop("cache_warning"))
        self.metrics.set(**{k if k.startswith("quant") else f"quant_{k}": v for k, v in ctx.info.items()})
        run.params = vectors
        if self.info.needs_mask:
            run.vectors = vectors

    # -- evaluation and training -------------------------------------------------------------------
    def evaluate(self, phase: str, key: str, enabled: bool) -> None:
        if enabled and self.record.accuracy_meaningful:
            with self.phase(phase):
                self.metrics.set(**{key: self.score(self.run_state.splits.test, key)})

    def score(self, examples, name: str) -> dict:
        """The scores of ``examples`` now, their per-example predictions kept as evaluation ``name``."""
        details: dict = {}
        scores = self.run_state.evaluate(examples, details)
        self.predictions.add(name, details)
        return scores

    def train(self) -> None:
        cfg, run = self.cfg, self.run_state
        if cfg.steps == 0:  # evaluation only (zobench eval): nothing is built, nothing touches the weights
            StepTiming().into(self.metrics, None)
            return
        stepper, trainable = self.method.build_stepper(run)
        if trainable is not None:
            self.metrics.set(trainable_numel=trainable.numel, **measure_restore_drift(trainable, cfg.eps))
        elif stepper.numel is not None:
            self.metrics.set(trainable_numel=stepper.numel)
        self.stepper, self.trainable = stepper, trainable
        fused.pass_stats(reset=True)  # this cell's passes from here (the mask's or an earlier cell's are not)
        reference = None if self.info.family == "reference" else ForwardReference(run.model, run.loss_fn)
        timing, self.selection = StepTiming(), DevSelection(trainable, to_disk=cfg.eval_after)
        stream = run.batches()
        warm = min(cfg.warmup_steps, cfg.steps)
        start = resume.restore(self, stepper, trainable, timing, reference, stream) if self.resumed else 0
        shapes = cfg.shape_warmup == "always" or (cfg.shape_warmup == "auto" and self.device.startswith("cuda"))
        for name, steps in (("warmup", range(start, warm)), ("train", range(max(start, warm), cfg.steps))):
            if start and not steps:
                continue  # the checkpoint is past the warm-up: this process has no warm-up phase
            with self.phase(name):
                if shapes:  # in this process's first phase, before its first step
                    batches = (run.encode(b) for b in itertools.islice(run.batches(), start, cfg.steps))
                    self.metrics.set(shape_warmup=warm_shapes(run.model, run.loss_fn, batches))
                    shapes = False
                for i, batch, res in train_steps(stepper, stream, steps, run.encode):
                    self.after_step(stepper, batch, res, i, timing, name == "train", reference)
        timing.flush(stepper)  # the last update, folded into no next step: now the weights are the trained ones
        timing.into(self.metrics, reference)
        self.metrics.set(zo_passes=zo_passes(run.model))

    def after_step(self, stepper, batch: dict, res, i: int, timing: "StepTiming", timed: bool, reference) -> None:
        """The cell's books after step ``i``: timings, the reference forward, progress, dev, checkpoints."""
        run = self.run_state
        timing.add(res, int(batch["attention_mask"].sum()), timed)  # warm-up steps: curves, not timings
        if timed and reference is not None and len(timing.seconds) % self.cfg.ref_every == 0:
            reference.time(batch, res.total_s)
        self.notify({"step": i + 1, "steps": self.cfg.steps, "loss": res.loss})
        if self.cfg.eval_every and (i + 1) % self.cfg.eval_every == 0 and self.record.accuracy_meaningful:
            timing.flush(stepper)  # dev sees (and a snapshot keeps) the weights of step i + 1
            with self.phase.aside("eval_dev"):  # its own phase: out of the training peak (a forward cell has none)
                dev = self.score(run.splits.dev, f"dev_{i + 1}")
            self.metrics.values.setdefault("dev_curve", []).append({"step": i + 1, **dev, "train_s": timing.total})
            self.selection.see(i + 1, dev)
        if self.cfg.checkpoint and self.trainable is not None and stepper.resumable:
            if i + 1 >= min(self.cfg.warmup_steps, self.cfg.steps) and \
                    checkpoint.due(i + 1, self.cfg.steps, self.cfg.eval_every):
                resume.save_checkpoint(self, i + 1, timing, reference)

    # -- checkpoints (zobench.cell.checkpoint) -----------------------------------------------------
    def load_checkpoint(self) -> None:
        if self.cfg.checkpoint:
            self.resumed, why = checkpoint.load(self.cfg.checkpoint, cell_id(self.cfg))
            if why:
                self.record.add_warning(why)

    def select_best(self) -> None:
        """Test accuracy at the best dev step beside the last step's (MeZO reports the best checkpoint on
        dev). Sparse methods keep their best trained values; dense ZO reads that step's weights back from
        disk, or rebuilds them from the initial ones and the recorded trajectory (``DevSelection``), in a
        phase of its own."""
        sel, m = self.selection, self.metrics
        if sel is None or sel.best_step is None:
            return
        m.set(best_step=sel.best_step, best_dev=sel.best)
        if not self.cfg.eval_after:  # a learning-rate pilot: the test set is never touched
            return
        test = self.run_state.splits.test
        if sel.best_step == m.get("steps_done"):
            m.set(test_best=m.get("test_after"), best_weights="last")
            if "test_after" in self.predictions.entries:
                self.predictions.entries["test_best"] = self.predictions.entries["test_after"]
        elif sel.values is not None:
            self.trainable.load(sel.values)
            with self.phase("eval_best"):
                m.set(test_best=self.score(test, "test_best"), best_weights="kept")
        elif sel.file is not None:
            with self.phase("eval_best"):
                self.trainable.load_raw(sel.file)
                m.set(test_best=self.score(test, "test_best"), best_weights="disk")
        elif m.get("trajectory") is not None:
            with self.phase("eval_best"):
                self.rebuild(sel.best_step)
                m.set(test_best=self.score(self.run_state.splits.test, "test_best"), best_weights="replay")
        sel.close()  # the weights file, also where the best step was the last and it went unread

    def rebuild(self, steps: int) -> Run:
        """A fresh copy of the model at ``steps`` steps, from the initial weights and the trajectory."""

        cfg, old = self.cfg, self.run_state
        old.loaded = self.stepper = self.trainable = None  # the trained model goes before the rebuilt one
        run = Run.of(cfg, self.device, old.task, old.splits, cache_root=old.cache_root)
        spec = cfg.model if self.record.model_fallback_reason is None else cfg.model_fallback
        run.loaded = load_model(spec, cfg.dtype, cfg.seed, cfg.trust_remote_code, self.device)
        run.params = scoped_params(run.model, cfg.resolved_scope)
        stepper, trainable = self.method.build_stepper(run)
        measure_restore_drift(trainable, cfg.eps)  # training ran this probe first: so does the replay
        replay(trainable, stepper.optimizer, self.metrics.get("trajectory"), cfg.eps, steps)
        self.run_state, self.stepper, self.trainable = run, stepper, trainable  # what a save then saves
        return run


def run_cell(cfg: CellConfig, progress: Progress | None = None, splits: Splits | None = None) -> CellRecord:
    """Run one cell (a suite cell, `zobench train`, an influence fine-tune) and return its record; ``splits``:
    examples of the caller's own instead of the task's seeded sample."""
    return Pipeline(cfg, progress, splits).run()
