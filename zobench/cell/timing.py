"""Timings of one cell: its measured phases, every step's loss and directions, the timed steps' seconds by
part, and the in-cell reference forwards that "step / two forwards" divides by."""

from __future__ import annotations

import contextlib
import time

import torch

from zobench.cell.measures import Metrics, PhaseMeasure, Stats
from zobench.measure.bandwidth import copy_gb_s
from zobench.measure.memory import highest
from zobench.measure.phases import phase
from zobench.quant.sparse import sparse_bypassed
from zobench.zo import fused
from zobench.zo.trainer import ForwardOnly


class Phases:
    """``with phases("train"): ...`` measures the block (``measure.phases.phase``: numbers) and keeps them in
    ``into`` as the record's ``PhaseMeasure`` of that name.

    ``with phases.aside("eval_dev"): ...`` inside a phase measures the block as a phase of its own and leaves
    it out of the open phase: out of its peaks, its wall and its CPU seconds. Blocks of one name add up (wall
    and CPU summed, peaks the highest). The dev evaluations inside training are measured so: a forward cell
    has none, so a training peak that held them (a forward at the evaluation batch) was not the training's."""

    def __init__(self, device: str, into: dict):
        self.device, self.data, self.open = device, into, []

    @contextlib.contextmanager
    def __call__(self, name: str):
        with phase(self.device) as numbers:
            self.open.append([numbers, 0.0, 0.0])  # the phase's figures, and the wall and CPU set aside in it
            try:
                yield
            finally:
                _, wall, cpu = self.open.pop()
        numbers.update(wall_s=numbers["wall_s"] - wall,
                       cpu_s=None if numbers.get("cpu_s") is None else numbers["cpu_s"] - cpu)
        self.data[name] = PhaseMeasure(**numbers)

    @contextlib.contextmanager
    def aside(self, name: str):
        outer = self.open[-1] if self.open else None
        with outer[0].set_aside() if outer else contextlib.nullcontext():
            with phase(self.device) as numbers:
                yield
        m = PhaseMeasure(**numbers)
        if outer:
            outer[1] += m.wall_s
            outer[2] += m.cpu_s or 0.0
        self.data[name] = _added(self.data.get(name), m)


def _added(a: PhaseMeasure | None, b: PhaseMeasure) -> PhaseMeasure:
    """Two blocks of one phase as one: wall and CPU seconds summed, peaks the higher, the other load weighted
    by wall time, start from the first and end from the last."""
    if a is None:
        return b
    wall = a.wall_s + b.wall_s
    load = None if a.other_cpus is None or b.other_cpus is None or wall <= 0 else \
        (a.other_cpus * a.wall_s + b.other_cpus * b.wall_s) / wall
    merged = highest(vars(b), vars(a))  # every *_mib figure the higher of the two (a peak's merge)
    merged.update(wall_s=wall, start_rss_mib=a.start_rss_mib, end_rss_mib=b.end_rss_mib, other_cpus=load,
                  device_source=a.device_source or b.device_source,
                  rss_method=a.rss_method if a.rss_method == b.rss_method else "sampled",
                  cpu_s=None if a.cpu_s is None or b.cpu_s is None else a.cpu_s + b.cpu_s)
    return PhaseMeasure(**merged)


class ForwardReference:
    """One inference forward of the model being trained, on the batch just stepped, timed right after
    the step: the denominator of "step / two forwards", measured in the same process and interleaved
    with the steps so it sees the same machine state (a suite's forward cell runs in another process,
    at another time). Dense-and-sparse layers are bypassed: the reference is the plain (quantized)
    model, as in a forward cell. Not part of step time."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        self.model, self.forward, self.seconds = model, ForwardOnly(model, loss_fn), []
        self.ratios = []  # each timed step over two of the forwards timed right after it: a pair saw one load

    def time(self, batch, step_s: float) -> None:
        was_training = self.model.training
        self.model.eval()
        with sparse_bypassed(self.model):
            self.seconds.append(self.forward.step(batch, 0).total_s)
        self.model.train(was_training)
        self.ratios.append(step_s / (2 * self.seconds[-1]))


def warm_shapes(model: torch.nn.Module, loss_fn, batches) -> dict:
    """One inference forward at each distinct shape among ``batches`` (encoded), before any step is timed.

    A device may set work up per input shape: on CUDA, torch's cuDNN attention builds a plan the first time
    it sees a sequence length (~40 ms on an H200 against a 3 ms forward of a tiny Llama,
    ``bench/new_batch.py``). A long run pays that once per length among thousands of steps; a cell of twenty
    timed steps, whose padded batches mostly bring a new length, would pay it in most steps, and its in-cell
    reference forwards, run at a length just seen, never. Warming the shapes first times the steady state for
    both. The forwards change no weights and leave every random generator as it was. Returns ``{"shapes",
    "seconds"}`` for the record."""
    firsts: dict = {}
    for batch in batches:
        key = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()) if torch.is_tensor(v))
        firsts.setdefault(key, batch)
    device = next(model.parameters()).device
    forward = ForwardOnly(model, loss_fn)
    t = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in firsts.values():
            forward.step(batch, 0)
    return {"shapes": len(firsts), "seconds": time.perf_counter() - t}


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

    def flush(self, stepper) -> None:
        """Apply a stepper's pending (folded) update; its seconds count as training time (they are the
        update pass that no later step took in)."""
        t = time.perf_counter()
        stepper.flush()
        self.total += time.perf_counter() - t

    def into(self, m: Metrics, reference) -> None:
        m.values.setdefault("dev_curve", [])
        m.set(loss_curve=self.losses, final_loss=self.losses[-1] if self.losses else None,
              steps_done=len(self.losses), step_s=Stats.of(self.seconds), train_s=self.total,
              step_parts_s={k: Stats.of(v) for k, v in self.parts.items()})
        if any(self.trajectory):  # ZO: the run as (seed, coefficient) per step, enough to rebuild any step
            m.set(trajectory=self.trajectory)
        if reference is not None and reference.seconds:
            m.set(forward_ref_s=Stats.of(reference.seconds), step_over_ref=Stats.of(reference.ratios))
        if self.seconds:
            m.set(tokens_per_step=sum(self.tokens) / len(self.tokens))
            m.set(tokens_per_s=m.throughput())


def zo_passes(model: torch.nn.Module) -> dict | None:
    """What this cell's ZO passes over the trainable values did since the last ``fused.pass_stats(reset=True)``
    (the start of its training): which implementation ran them (calls per path: ``c-openmp``, ``torch``),
    their throughput in GB/s (bytes read and written over the passes' seconds) and, beside it, a plain copy
    of the model's weights measured now, in the same process. None where no pass ran (first-order methods,
    the torch.Generator directions)."""
    stats = fused.pass_stats(reset=True)
    if not stats["calls"]:
        return None
    gb_s = stats["bytes"] / stats["seconds"] / 1e9 if stats["seconds"] > 0 else None
    copy = copy_gb_s([p for p in model.parameters()])
    return {"paths": stats["calls"], "pass_gb_s": gb_s, "copy_gb_s": copy,
            "pass_over_copy": gb_s / copy if gb_s and copy else None}
