"""One run (a suite cell, or `zobench train`): load -> mask -> quantize -> eval -> warm-up -> train -> eval,
each phase measured.

Returns a plain dict record. Phases each get their own wall time and peak memory (reset per phase),
so the mask's gradient pass, for example, does not hide inside the training peak.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from typing import Callable, Iterator

import torch

from zobench.config import ZO_METHODS, CellConfig
from zobench.errors import Unsupported, UserError
from zobench.measure.memory import PeakMemory

Progress = Callable[[dict], None]
SPARSE_ZO = tuple(m for m in ZO_METHODS if m != "full")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Phases:
    """``with phases("train"): ...`` records seconds and peak memory of the block under its name."""

    def __init__(self, device: str):
        self.device, self.data = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        with PeakMemory(self.device) as mem:
            yield
        self.data[name] = {"seconds": time.perf_counter() - start, **mem.result}


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


def summarize_seconds(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = statistics.quantiles(values, n=10) if len(values) >= 2 else [values[0]] * 9
    return {"median": statistics.median(values), "p10": q[0], "p90": q[-1], "n": len(values)}


class ForwardReference:
    """One inference forward of the model being trained, on the batch just stepped, timed right after
    the step: the denominator of "step / two forwards", measured in the same process and interleaved
    with the steps, so it sees the same machine state (across processes, medians of the same forward
    on this 2-core VM differed by ~8%: 2.29 vs 2.48 s). Dense-and-sparse layers are bypassed: the
    reference is the plain (quantized) model, as in a suite's forward cell. Not part of step time."""

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


def build_stepper(cfg: CellConfig, loaded, params, mask, loss_fn, total_steps: int, vectors=None):
    """The object whose ``step(batch, i)`` runs one training step of ``cfg.method``."""
    from zobench.zo.fo import FOTrainer
    from zobench.zo.optim import make_optimizer
    from zobench.zo.trainable import DenseTrainable, SparseTrainable
    from zobench.zo.trainer import ForwardOnly, ZOTrainer

    if cfg.method == "forward":
        return ForwardOnly(loaded.model, loss_fn), None
    if cfg.method in ("fo-sgd", "fo-adam", "lora"):
        return FOTrainer(loaded.model, loss_fn, cfg.method, cfg.lr, cfg.weight_decay), None
    opt = make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.schedule, total_steps, cfg.momentum)
    if cfg.method == "full":
        trainable = DenseTrainable(params, cfg.direction, master=cfg.master_fp32)
    elif vectors is not None:  # quantized: the sparse values beside the quantized layers
        trainable = SparseTrainable.of_vectors(vectors, cfg.direction)
    else:
        trainable = SparseTrainable(params, mask, cfg.direction)
    return ZOTrainer(loaded.model, trainable, opt, loss_fn, cfg.eps, cfg.q, cfg.seed), trainable


def check_quant(cfg: CellConfig, device: str):
    """The cell's quant backend (None for "none"), or ``Unsupported`` before anything loads."""
    if cfg.quant == "none":
        return None
    from zobench.quant import get_backend

    backend = get_backend(cfg.quant)
    backend.check_available(device)
    if not backend.perturbable and cfg.method not in ("forward", *SPARSE_ZO):
        raise Unsupported(f"method '{cfg.method}' changes every weight, and {cfg.quant} weights are "
                          f"quantized codes that cannot move by eps*z; use a sparse method "
                          f"(random, sensitive), which trains 16/32-bit values beside the quantized layers")
    return backend


def _count_truncated(rec: dict, splits, tokenizer, kind: str, max_length: int) -> None:
    """Truncated inputs per split into the record, and a warning for each split that has any: a cut
    input silently loses the start of its passage (MeZO at least logs "Exceed max length")."""
    from zobench.tasks import scoring

    counts = {}
    for name in ("train", "dev", "test"):
        examples = getattr(splits, name)
        counts[name] = scoring.count_truncated(examples, tokenizer, kind, max_length, train=name == "train")
        if counts[name]:
            rec.setdefault("warnings", []).append(
                f"max_length {max_length} truncates {counts[name]} of {len(examples)} {name} examples "
                f"(from the left); raise max_length to keep them whole")
    rec["metrics"]["truncated"] = dict(counts, max_length=max_length)


def run_cell(cfg: CellConfig, progress: Progress | None = None) -> dict:
    from zobench.models import load_model
    from zobench.models.load import cache_dir
    from zobench.tasks import get_task, scoring
    from zobench.zo.mask_build import MaskSpec, build_mask
    from zobench.zo.masks import scoped_params
    from zobench.zo.trainable import measure_restore_drift

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars would flood suite logs
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Unsupported(f"needs a CUDA device (device={cfg.device}); this machine has none")
    backend = check_quant(cfg, device)
    phases = Phases(device)
    rec: dict = {"config": cfg.to_dict(), "device": device, "metrics": {}, "phases": phases.data}
    m = rec["metrics"]
    notify = progress or (lambda _: None)

    task = get_task(cfg.task)
    splits = task.sample(cfg.data_dir, cfg.n_train, cfg.n_dev, cfg.n_test, cfg.seed)
    m.update(n_train=len(splits.train), n_dev=len(splits.dev), n_test=len(splits.test))
    if getattr(splits, "note", None):
        rec["data_note"] = splits.note

    with phases("load"):
        try:
            loaded = load_model(cfg.model, cfg.dtype, cfg.seed, cfg.trust_remote_code, device)
        except UserError as e:
            if not cfg.model_fallback:
                raise
            rec["model_fallback_reason"] = str(e)
            loaded = load_model(cfg.model_fallback, cfg.dtype, cfg.seed, cfg.trust_remote_code, device)
    model, tok = loaded.model, loaded.tokenizer
    _count_truncated(rec, splits, tok, task.kind, cfg.max_length)
    rec["model_source"] = loaded.source
    rec["accuracy_meaningful"] = not loaded.random_weights
    vocab = loaded.vocab_size if loaded.random_weights else None
    m["model_numel"] = sum(p.numel() for p in model.parameters())

    def encode(examples, train=True):
        return scoring.encode(examples, tok, task.kind, max_length=cfg.max_length, train=train, vocab_size=vocab)

    def evaluate(examples):
        return scoring.evaluate(model, tok, task.kind, examples, batch_size=cfg.eval_batch_size,
                                max_length=cfg.max_length, vocab_size=vocab)

    loss_fn = scoring.loss

    params = scoped_params(model, cfg.resolved_scope)
    mask = None
    if cfg.is_sparse:
        spec = MaskSpec(cfg.method, cfg.density, cfg.resolved_scope, cfg.per_tensor, cfg.seed, cfg.calib_path,
                        cfg.calib_sequences, cfg.calib_length,
                        extra_key={"task": cfg.task, "n_train": cfg.n_train} if cfg.method == "task_grad" else {})
        task_batches = None
        if cfg.method == "task_grad":
            stream = batch_stream(splits.train, cfg.batch_size, cfg.seed + 1)
            task_batches = [encode(next(stream)) for _ in range(max(1, cfg.calib_sequences // cfg.batch_size))]
        with phases("mask"):
            mask, info = build_mask(spec, model, tok, params, cache_dir(), cfg.data_dir, task_batches,
                                    loss_fn, vocab)
        if "cache_warning" in info:
            rec.setdefault("warnings", []).append(info.pop("cache_warning"))
        m.update(info)
    elif cfg.method == "full":
        m.update(mask_nnz=sum(p.numel() for _, p in params), scope_numel=sum(p.numel() for _, p in params),
                 density_obtained=1.0)

    vectors = None
    if backend is not None:
        from zobench.quant import QuantContext, quantize_model

        ctx = QuantContext(device=device, dtype=next(model.parameters()).dtype, tokenizer=tok,
                           data_dir=cfg.data_dir, calib_path=cfg.calib_path, calib_sequences=cfg.calib_sequences,
                           calib_length=cfg.calib_length, vocab_size=vocab, seed=cfg.seed,
                           cache_dir=cache_dir())
        with phases("quantize"):
            vectors = quantize_model(model, backend, ctx, mask)
        if "cache_warning" in ctx.info:
            rec.setdefault("warnings", []).append(ctx.info.pop("cache_warning"))
        m.update({f"quant_{k}" if not k.startswith("quant") else k: v for k, v in ctx.info.items()})
        params = vectors

    # After masking and quantization: "before" is the model that training starts from.
    if cfg.eval_before and rec["accuracy_meaningful"]:
        with phases("eval_before"):
            m["test_before"] = evaluate(splits.test)

    stepper, trainable = build_stepper(cfg, loaded, params, mask, loss_fn, cfg.steps,
                                       vectors if cfg.is_sparse else None)
    if trainable is not None:
        m["trainable_numel"] = trainable.numel
        m.update(measure_restore_drift(trainable, cfg.eps))

    reference = None if cfg.method == "forward" else ForwardReference(model, loss_fn)
    stream = batch_stream(splits.train, cfg.batch_size, cfg.seed)
    losses, step_s, parts, tokens = [], [], {}, []
    m["dev_curve"] = []
    warm = min(cfg.warmup_steps, cfg.steps)
    for name, steps in (("warmup", range(warm)), ("train", range(warm, cfg.steps))):
        with phases(name):
            for i in steps:
                batch = encode(next(stream))
                res = stepper.step(batch, i)
                losses.append(res.loss)
                if name == "train":
                    if reference is not None:
                        reference.time(batch)
                    step_s.append(res.total_s)
                    tokens.append(int(batch["attention_mask"].sum()))
                    for k, v in res.seconds.items():
                        parts.setdefault(k, []).append(v)
                notify({"step": i + 1, "steps": cfg.steps, "loss": res.loss})
                if cfg.eval_every and (i + 1) % cfg.eval_every == 0 and rec["accuracy_meaningful"]:
                    m["dev_curve"].append({"step": i + 1, **evaluate(splits.dev)})
    m["loss_curve"] = losses
    m["final_loss"] = losses[-1] if losses else None
    m["steps_done"] = len(losses)
    m["step_s"] = summarize_seconds(step_s)
    m["step_parts_s"] = {k: summarize_seconds(v) for k, v in parts.items()}
    if reference is not None and reference.seconds:
        m["forward_ref_s"] = summarize_seconds(reference.seconds)
    if step_s:
        m["tokens_per_s"] = sum(tokens) / sum(step_s)
    if cfg.eval_after and rec["accuracy_meaningful"]:
        with phases("eval_after"):
            m["test_after"] = evaluate(splits.test)
    rec["status"] = "ok"
    return rec
