"""One cell as a pipeline of measured phases: load -> mask -> quantize -> evaluate -> train -> evaluate.

    run_cell(cfg) -> CellRecord

Each step is a short method of ``Pipeline`` and each measured phase gets its own wall time and peak
memory (reset at its start), so the mask's gradient pass, for example, does not hide inside the training
peak. What differs between methods is asked of the method (``zobench.methods``): whether it builds a mask,
whether it runs beside quantized weights, how it steps. ``Run`` is what a method sees of the cell.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from zobench.cell.record import CellRecord, Metrics, Stats
from zobench.errors import Unsupported, UserError
from zobench.measure.phases import Phases
from zobench.spec.config import CellConfig

Progress = Callable[[dict], None]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def batch_stream(examples: list, batch_size: int, seed: int) -> Iterator[list]:
    """Shuffled batches, reshuffled each epoch, from a seeded RNG (same seed -> same batches)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]
        if len(order) < batch_size:
            yield [examples[j] for j in order]


@dataclass
class Run:
    """The state of one cell that methods build on (see ``zobench.methods.base``)."""

    cfg: CellConfig
    device: str
    task: Any
    splits: Any
    loaded: Any = None              # zobench.models.load.LoadedModel
    params: list = field(default_factory=list)   # (name, parameter) in the method's scope
    mask: dict | None = None        # flat indices per tensor (mask methods)
    vectors: list | None = None     # the trainable values beside quantized layers (quantized mask methods)
    cache_root: Path | None = None

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def vocab(self) -> int | None:
        """Random-weight models borrow the embedded tokenizer: token ids are folded into their vocabulary."""
        return self.loaded.vocab_size if self.loaded.random_weights else None

    @staticmethod
    def loss_fn(model, batch):
        from zobench.tasks import scoring

        return scoring.loss(model, batch)

    def encode(self, examples, train: bool = True) -> dict:
        from zobench.tasks import scoring

        return scoring.encode(examples, self.tokenizer, self.task.kind, max_length=self.cfg.max_length,
                              train=train, vocab_size=self.vocab, shared=self.cfg.shared_prompt, pack=self.cfg.pack)

    def evaluate(self, examples) -> dict:
        from zobench.tasks import scoring

        return scoring.evaluate(self.model, self.tokenizer, self.task.kind, examples,
                                batch_size=self.cfg.eval_batch_size, max_length=self.cfg.max_length,
                                vocab_size=self.vocab, shared=self.cfg.shared_prompt, pack=self.cfg.pack)

    def batches(self, seed: int | None = None) -> Iterator[list]:
        return batch_stream(self.splits.train, self.cfg.batch_size, self.cfg.seed if seed is None else seed)


class ForwardReference:
    """One inference forward of the model being trained, on the batch just stepped, timed right after
    the step: the denominator of "step / two forwards", measured in the same process and interleaved
    with the steps so it sees the same machine state (a suite's forward cell runs in another process,
    at another time). Dense-and-sparse layers are bypassed: the reference is the plain (quantized)
    model, as in a forward cell. Not part of step time."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        from zobench.zo.trainer import ForwardOnly

        self.model, self.forward, self.seconds = model, ForwardOnly(model, loss_fn), []

    def time(self, batch) -> None:
        from zobench.quant.sparse import sparse_bypassed

        was_training = self.model.training
        self.model.eval()
        with sparse_bypassed(self.model):
            self.seconds.append(self.forward.step(batch, 0).total_s)
        self.model.train(was_training)


class Pipeline:
    """The phases of one cell; ``run()`` returns its record (status "ok") or raises."""

    def __init__(self, cfg: CellConfig, progress: Progress | None = None):
        self.cfg, self.notify = cfg, progress or (lambda _: None)
        self.method = cfg.method_class()
        self.device = resolve_device(cfg.device)
        self.record = CellRecord(cell_id="", config=cfg.to_dict(), device=self.device)
        self.metrics: Metrics = self.record.metrics
        self.phase = Phases(self.device, self.record.phases)
        self.backend = None
        self.run_state: Run | None = None
        self.stepper = self.trainable = self.selection = None
        self.base_fingerprint = None
        self.resumed = None  # a checkpoint this cell goes on from (zobench.cell.checkpoint)

    def run(self) -> CellRecord:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars would flood suite logs
        torch.manual_seed(self.cfg.seed)
        self.check_supported()
        self.sample_data()
        with self.phase("load"):
            self.load()
            if self.cfg.delta:
                from zobench.cell.keep import load_into

                self.metrics.set(delta=load_into(self))
        self.count_truncated()
        self.note_packing()
        if self.method.needs_mask and self.run_state.mask is None:
            with self.phase("mask"):
                self.build_mask()
        if self.backend is not None:
            with self.phase("quantize"):
                self.quantize()
        self.load_checkpoint()
        # After masking and quantization: "before" is the model that training starts from.
        if self.resumed is not None and self.resumed.test_before is not None:
            self.metrics.set(test_before=self.resumed.test_before)
        else:
            self.evaluate("eval_before", "test_before", self.cfg.eval_before)
        self.train()
        self.evaluate("eval_after", "test_after", self.cfg.eval_after)
        self.select_best()
        if self.cfg.save:
            from zobench.cell.keep import save_from

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
        from zobench.quant import get_backend

        self.backend = get_backend(self.cfg.quant)
        self.backend.check_available(self.device)
        if not self.backend.perturbable and not self.method.quantized:
            raise Unsupported(f"method '{self.cfg.method}' changes every weight, and {self.cfg.quant} weights are "
                              f"quantized codes that cannot move by eps*z; use a sparse method (random, "
                              f"sensitive), which trains 16/32-bit values beside the quantized layers")

    def sample_data(self) -> None:
        from zobench.models.load import cache_dir
        from zobench.tasks import get_task

        cfg = self.cfg
        task = get_task(cfg.task)
        splits = task.sample(cfg.data_dir, cfg.n_train, cfg.n_dev, cfg.n_test, cfg.seed)
        self.metrics.set(n_train=len(splits.train), n_dev=len(splits.dev), n_test=len(splits.test))
        self.record.data_note = getattr(splits, "note", None)
        self.run_state = Run(cfg, self.device, task, splits, cache_root=cache_dir())

    def load(self) -> None:
        from zobench.models import load_model

        cfg, rec = self.cfg, self.record
        try:
            loaded = load_model(cfg.model, cfg.dtype, cfg.seed, cfg.trust_remote_code, self.device)
        except UserError as e:
            if not cfg.model_fallback:
                raise
            rec.model_fallback_reason = str(e)
            loaded = load_model(cfg.model_fallback, cfg.dtype, cfg.seed, cfg.trust_remote_code, self.device)
        run = self.run_state
        run.loaded = loaded
        rec.model_source, rec.accuracy_meaningful = loaded.source, not loaded.random_weights
        self.metrics.set(model_numel=sum(p.numel() for p in loaded.model.parameters()))
        from zobench.cell.delta import base_fingerprint
        from zobench.zo.masks import scoped_params

        self.base_fingerprint = base_fingerprint(loaded.model)  # what a saved delta will require of its base

        run.params = scoped_params(loaded.model, cfg.resolved_scope)
        if self.method.family == "zo" and not self.method.needs_mask:  # dense ZO: the whole scope moves
            n = sum(p.numel() for _, p in run.params)
            self.metrics.set(mask_nnz=n, scope_numel=n, density_obtained=1.0)

    def count_truncated(self) -> None:
        """Truncated inputs per split into the record, and a warning for each split that has any: a cut
        input silently loses the start of its passage (MeZO at least logs "Exceed max length")."""
        from zobench.tasks import scoring

        run, counts = self.run_state, {}
        for name in ("train", "dev", "test"):
            examples = getattr(run.splits, name)
            counts[name] = scoring.count_truncated(examples, run.tokenizer, run.task.kind, self.cfg.max_length,
                                                   train=name == "train")
            if counts[name]:
                self.record.add_warning(f"max_length {self.cfg.max_length} truncates {counts[name]} of "
                                        f"{len(examples)} {name} examples (from the left); raise max_length "
                                        f"to keep them whole")
        self.metrics.set(truncated=dict(counts, max_length=self.cfg.max_length))

    def note_packing(self) -> None:
        """With ``pack`` set, whether this model takes packed rows; a model that cannot keeps padding, and
        the record says so (its timings are padded ones)."""
        from zobench.tasks import scoring

        if not self.cfg.pack:
            return
        model = self.run_state.model
        self.metrics.set(packed=scoring.packs(model))
        if not scoring.packs(model):
            kind = getattr(getattr(model, "config", None), "model_type", "?")
            self.record.add_warning(f"pack: {kind} models are not packed (packed: "
                                    f"{', '.join(scoring.PACKED_MODEL_TYPES)}); its batches stay padded")

    def build_mask(self) -> None:
        mask, info = self.method.build_mask(self.run_state)
        if "cache_warning" in info:
            info = dict(info)
            self.record.add_warning(info.pop("cache_warning"))
        self.run_state.mask = mask
        self.metrics.set(**info)

    def quantize(self) -> None:
        from zobench.quant import QuantContext, quantize_model
        from zobench.quant.sparse import SparseDelta

        cfg, run = self.cfg, self.run_state
        ctx = QuantContext(device=self.device, dtype=next(run.model.parameters()).dtype, tokenizer=run.tokenizer,
                           data_dir=cfg.data_dir, calib_path=cfg.calib_path, calib_sequences=cfg.calib_sequences,
                           calib_length=cfg.calib_length, vocab_size=run.vocab, seed=cfg.seed,
                           cache_dir=run.cache_root)
        vectors = quantize_model(run.model, self.backend, ctx, run.mask)
        ways = sorted({m.way for m in run.model.modules() if isinstance(m, SparseDelta)})
        if ways:  # how the dense-and-sparse layers add their values (quant.sparse): merge, csr or gather
            ctx.info["sparse_way"] = ",".join(ways)
        if "cache_warning" in ctx.info:
            self.record.add_warning(ctx.info.pop("cache_warning"))
        self.metrics.set(**{k if k.startswith("quant") else f"quant_{k}": v for k, v in ctx.info.items()})
        # The float weights in run.params were replaced by quantized layers: drop the references, or the
        # whole float model stays alive beside the quantized one.
        run.params = vectors
        if self.method.needs_mask:
            run.vectors = vectors

    # -- evaluation and training -------------------------------------------------------------------
    def evaluate(self, phase: str, key: str, enabled: bool) -> None:
        if enabled and self.record.accuracy_meaningful:
            with self.phase(phase):
                self.metrics.set(**{key: self.run_state.evaluate(self.run_state.splits.test)})

    def train(self) -> None:
        from zobench.zo.trainable import measure_restore_drift

        cfg, run = self.cfg, self.run_state
        if cfg.steps == 0:  # evaluation only (zobench eval): nothing is built, nothing touches the weights
            StepTiming().into(self.metrics, None)
            return
        stepper, trainable = self.method.build_stepper(run)
        if trainable is not None:
            self.metrics.set(trainable_numel=trainable.numel, **measure_restore_drift(trainable, cfg.eps))
        elif getattr(stepper, "numel", None) is not None:
            self.metrics.set(trainable_numel=stepper.numel)
        self.stepper, self.trainable = stepper, trainable
        reference = None if self.method.family == "reference" else ForwardReference(run.model, run.loss_fn)
        timing, self.selection = StepTiming(), DevSelection(trainable, to_disk=cfg.eval_after)
        stream = run.batches()
        warm = min(cfg.warmup_steps, cfg.steps)
        start = self.restore(stepper, trainable, timing, reference, stream) if self.resumed else 0
        for name, steps in (("warmup", range(start, warm)), ("train", range(max(start, warm), cfg.steps))):
            if start and not steps:
                continue  # the checkpoint is past the warm-up: this process has no warm-up phase
            with self.phase(name):
                for i in steps:
                    self.step(stepper, next(stream), i, timing, name == "train", reference)
        timing.into(self.metrics, reference)

    def step(self, stepper, examples: list, i: int, timing: "StepTiming", timed: bool, reference) -> None:
        run = self.run_state
        batch = run.encode(examples)
        res = stepper.step(batch, i)
        timing.add(res, int(batch["attention_mask"].sum()), timed)  # warm-up steps: curves, not timings
        if timed and reference is not None and len(timing.seconds) % self.cfg.ref_every == 0:
            reference.time(batch)
        self.notify({"step": i + 1, "steps": self.cfg.steps, "loss": res.loss})
        if self.cfg.eval_every and (i + 1) % self.cfg.eval_every == 0 and self.record.accuracy_meaningful:
            dev = run.evaluate(run.splits.dev)
            self.metrics.values.setdefault("dev_curve", []).append({"step": i + 1, **dev, "train_s": timing.total})
            self.selection.see(i + 1, dev)
        if self.cfg.checkpoint and self.trainable is not None and hasattr(stepper, "rng"):
            from zobench.cell import checkpoint

            if i + 1 >= min(self.cfg.warmup_steps, self.cfg.steps) and \
                    checkpoint.due(i + 1, self.cfg.steps, self.cfg.eval_every):
                self.save_checkpoint(i + 1, timing, reference)

    # -- checkpoints (zobench.cell.checkpoint) -----------------------------------------------------
    def load_checkpoint(self) -> None:
        from zobench.cell import checkpoint
        from zobench.spec.matrix import cell_id

        if self.cfg.checkpoint:
            self.resumed, why = checkpoint.load(self.cfg.checkpoint, cell_id(self.cfg))
            if why:
                self.record.add_warning(why)

    def save_checkpoint(self, step: int, timing: "StepTiming", reference) -> None:
        from zobench.cell import checkpoint
        from zobench.spec.matrix import cell_id, identity

        sel = self.selection
        checkpoint.save(self.cfg.checkpoint, checkpoint.Checkpoint(
            cell_id=cell_id(self.cfg), config=identity(self.cfg), step=step, losses=timing.losses,
            trajectory=timing.trajectory, seconds=timing.seconds, parts=timing.parts, tokens=timing.tokens,
            total=timing.total, reference_seconds=reference.seconds if reference is not None else [],
            dev_curve=self.metrics.get("dev_curve") or [], best_step=sel.best_step,
            best_scores=sel.best, test_before=self.metrics.get("test_before"),
            segments=self.resumed.segments if self.resumed else 1))

    def restore(self, stepper, trainable, timing: "StepTiming", reference, stream) -> int:
        """Bring the run to the checkpoint's step: its records so far, the batches and direction seeds
        drawn so far, and the trained values by replaying the trajectory (the best dev step's values
        kept on the way). Returns the step to go on from."""
        from zobench.zo.trainer import replay

        ck, cfg = self.resumed, self.cfg
        if trainable is None or not hasattr(stepper, "rng") or ck.step >= cfg.steps:
            self.record.add_warning(f"checkpoint at step {ck.step} does not fit this cell; it ran from step 0")
            self.resumed = None
            return 0
        timing.losses, timing.trajectory, timing.total = list(ck.losses), list(ck.trajectory), ck.total
        timing.seconds, timing.parts, timing.tokens = list(ck.seconds), dict(ck.parts), list(ck.tokens)
        if reference is not None:
            reference.seconds = list(ck.reference_seconds)
        self.metrics.set(dev_curve=list(ck.dev_curve))
        for _ in range(ck.step):
            next(stream)
        for step, directions in enumerate(ck.trajectory):
            drawn = [stepper.rng.randrange(2**62) for _ in directions]
            if drawn != [int(seed) for seed, _ in directions]:
                raise RuntimeError(f"checkpoint {cfg.checkpoint}: step {step + 1} drew other direction seeds "
                                   f"than recorded; delete it to run the cell from step 0")
        if ck.best_step is not None:  # replayed in two parts, to keep the best step's values on the way
            replay(trainable, stepper.optimizer, ck.trajectory, cfg.eps, ck.best_step)
            self.selection.see(ck.best_step, ck.best_scores)
        replay(trainable, stepper.optimizer, ck.trajectory, cfg.eps, ck.step, start=ck.best_step or 0)
        ck.segments += 1
        self.metrics.set(resumed_from_step=ck.step, segments=ck.segments)
        return ck.step

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
        if sel.best_step == m.get("steps_done"):
            m.set(test_best=m.get("test_after"), best_weights="last")
        elif sel.values is not None:
            self.trainable.load(sel.values)
            with self.phase("eval_best"):
                m.set(test_best=self.run_state.evaluate(self.run_state.splits.test), best_weights="kept")
        elif sel.file is not None:
            with self.phase("eval_best"):
                self.trainable.load_raw(sel.file)
                m.set(test_best=self.run_state.evaluate(self.run_state.splits.test), best_weights="disk")
        elif m.get("trajectory") is not None:
            with self.phase("eval_best"):
                m.set(test_best=self.rebuild(sel.best_step).evaluate(self.run_state.splits.test),
                      best_weights="replay")
        sel.close()  # the weights file, also where the best step was the last and it went unread

    def rebuild(self, steps: int) -> Run:
        """A fresh copy of the model at ``steps`` steps, from the initial weights and the trajectory."""
        from zobench.models import load_model
        from zobench.zo.masks import scoped_params
        from zobench.zo.trainable import measure_restore_drift
        from zobench.zo.trainer import replay

        cfg, old = self.cfg, self.run_state
        old.loaded = self.stepper = self.trainable = None  # the trained model goes before the rebuilt one
        run = Run(cfg, self.device, old.task, old.splits, cache_root=old.cache_root)
        spec = cfg.model if self.record.model_fallback_reason is None else cfg.model_fallback
        run.loaded = load_model(spec, cfg.dtype, cfg.seed, cfg.trust_remote_code, self.device)
        run.params = scoped_params(run.model, cfg.resolved_scope)
        stepper, trainable = self.method.build_stepper(run)
        measure_restore_drift(trainable, cfg.eps)  # training ran this probe first: so does the replay
        replay(trainable, stepper.optimizer, self.metrics.get("trajectory"), cfg.eps, steps)
        self.run_state, self.stepper, self.trainable = run, stepper, trainable  # what a save then saves
        return run


class DevSelection:
    """The best dev score so far, its step, and the trained values at that step where they are cheap to
    keep: a sparse method's few values in memory; a dense run's weights on disk when they train on a CPU.

    On a CPU a dense run's replay (``Pipeline.rebuild``) costs about the draws of its training: 800 steps of
    full ZO on SmolLM2-135M took 34 minutes, against 0.1 s to write its 513 MiB at each new best and 0.08 s
    to read them back (``bench/best_weights.py``).
    The file is anonymous (unlinked at creation), so the space comes back when the process ends, even when
    it is killed. On a GPU the replay's draws are fast and a 7B model's weights are gigabytes: it replays.
    So does a run whose disk has less than twice the weights free (``best_weights`` in the record says which).
    A learning-rate pilot (``to_disk`` false: it never tests) writes nothing.
    """

    def __init__(self, trainable, to_disk: bool = True):
        self.trainable, self.best_step, self.best_score, self.values = trainable, None, None, None
        self.to_disk = to_disk
        self.file = None  # the dense weights at best_step, when kept on disk

    def see(self, step: int, scores: dict) -> None:
        score = scores.get("accuracy", scores.get("f1"))
        if score is None or (self.best_score is not None and score <= self.best_score[1]):
            return
        self.best_step, self.best_score = step, (scores, score)
        if hasattr(self.trainable, "snapshot"):
            self.values = self.trainable.snapshot()
        elif self.to_disk and hasattr(self.trainable, "save_raw") and self._disk_fits():
            if self.file is None:
                import tempfile

                self.file = tempfile.TemporaryFile(prefix="zobench-best-")
            self.trainable.save_raw(self.file)

    def _disk_fits(self) -> bool:
        import shutil
        import tempfile

        if self.trainable.params[0].device.type != "cpu":
            return False
        return shutil.disk_usage(tempfile.gettempdir()).free >= 2 * self.trainable.nbytes

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    @property
    def best(self):
        return self.best_score[0] if self.best_score else None


class StepTiming:
    """Every step's loss and directions; the timed steps' seconds, parts and tokens, summarized into the
    record at the end."""

    def __init__(self):
        self.seconds, self.parts, self.tokens, self.losses, self.trajectory = [], {}, [], [], []
        self.total = 0.0  # training seconds so far, warm-up included (the x axis of accuracy vs time)

    def add(self, res, tokens: int, timed: bool) -> None:
        self.losses.append(res.loss)
        self.trajectory.append([[seed, coef] for seed, coef in res.directions])
        self.total += res.total_s
        if not timed:
            return
        self.seconds.append(res.total_s)
        self.tokens.append(tokens)
        for k, v in res.seconds.items():
            self.parts.setdefault(k, []).append(v)

    def into(self, m: Metrics, reference) -> None:
        m.values.setdefault("dev_curve", [])
        m.set(loss_curve=self.losses, final_loss=self.losses[-1] if self.losses else None,
              steps_done=len(self.losses), step_s=Stats.of(self.seconds), train_s=self.total,
              step_parts_s={k: Stats.of(v) for k, v in self.parts.items()})
        if any(self.trajectory):  # ZO: the run as (seed, coefficient) per step, enough to rebuild any step
            m.set(trajectory=self.trajectory)
        if reference is not None and reference.seconds:
            m.set(forward_ref_s=Stats.of(reference.seconds))
        if self.seconds:
            m.set(tokens_per_s=sum(self.tokens) / sum(self.seconds),
                  tokens_per_step=sum(self.tokens) / len(self.tokens))


def run_cell(cfg: CellConfig, progress: Progress | None = None) -> CellRecord:
    """Run one cell (a suite cell, or `zobench train`) and return its record."""
    return Pipeline(cfg, progress).run()
