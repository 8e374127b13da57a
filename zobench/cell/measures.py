"""The parts of a cell's record and the field checks every record type shares: ``Stats`` (repeated
timings), ``PhaseMeasure`` (one phase's wall time and peaks), ``Metrics`` (what a cell measured besides
phases), ``Execution`` (where and beside what it ran). ``cell.record.CellRecord`` holds them; each reads
itself from JSON with its type checked (``check_field``), naming the field when one is wrong."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, fields
from typing import Any

from zobench.errors import UserError

STATUSES = ("ok", "failed", "timeout", "unsupported", "lost")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def now() -> str:
    """The one timestamp format of records: ISO 8601, UTC, seconds."""
    return time.strftime(TIME_FORMAT, time.gmtime())


class SchemaError(UserError):
    """A record field of the wrong type; the message names the field."""


def check_field(value, kinds, name: str):
    if value is None or type(value) in kinds:  # what json builds: exact types (the common case, fast)
        return value
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return value
    expected = " or ".join(k.__name__ for k in kinds)
    raise SchemaError(f"field '{name}' = {shown_value(value)}: expected {expected}")


def shown_value(value) -> str:
    return repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."


NUMBER = (int, float)


def read_kinds(kinds: tuple) -> tuple:
    """The types a field of ``kinds`` may have as read back from JSON: an int field also takes a float (a
    count some writer stored as 3.0)."""
    return kinds + (float,) if kinds == (int,) else kinds


# The phases the training estimate covers (a record's phase names; ``CellRecord.estimated_phase_mib``), and
# the evaluations, which have an estimate of their own ("eval") where the estimator made one.
TRAIN_ESTIMATED = ("warmup", "train", "eval_before", "eval_dev", "eval_after", "eval_best")
EVAL_PHASES = ("eval_before", "eval_dev", "eval_after", "eval_best")


def estimate_key(phase: str, estimated) -> str:
    """The key of ``estimated`` (an estimate's phases) that predicts a record's ``phase``: its own name; the
    training estimate for warm-up and train; for an evaluation its own "eval" estimate, or the training
    estimate in estimates made before there was one."""
    if phase in EVAL_PHASES and "eval" in (estimated or {}):
        return "eval"
    return "train" if phase in TRAIN_ESTIMATED else phase

def _field(d, key: str):
    """``d[key]`` where ``d`` is a mapping that has it, else None: the free-form parts of a record (an
    evaluation's scores, the estimate, the kept artifact) may lack any key, or be absent, in older records."""
    return d.get(key) if isinstance(d, dict) else None


@dataclass
class Stats:
    """Seconds of repeated timings: median and the 10th/90th percentiles of ``n`` values."""

    median: float
    p10: float
    p90: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Stats | None":
        if not values:
            return None
        # inclusive: the percentiles stay inside the values (the default extrapolates past them for small n)
        q = statistics.quantiles(values, n=10, method="inclusive") if len(values) >= 2 else [values[0]] * 9
        return cls(statistics.median(values), q[0], q[-1], len(values))

    @classmethod
    def from_json(cls, d, name: str) -> "Stats | None":
        if d is None or d == {}:
            return None
        check_field(d, (dict,), name)
        for k in ("median", "p10", "p90"):
            if k not in d:
                raise SchemaError(f"field '{name}' has no '{k}'")
            if d[k] is None or not math.isfinite(check_field(d[k], NUMBER, f"{name}.{k}")):
                raise SchemaError(f"field '{name}.{k}' = {shown_value(d[k])}: expected a number of seconds")
        n = d.get("n", 0)
        if n is None or check_field(n, read_kinds((int,)), f"{name}.n") < 0 or n != int(n):
            raise SchemaError(f"field '{name}.n' = {shown_value(n)}: expected a count of timings")
        return cls(d["median"], d["p10"], d["p90"], int(n))

    def to_json(self) -> dict:
        return {"median": self.median, "p10": self.p10, "p90": self.p90, "n": self.n}


@dataclass
class PhaseMeasure:
    """One phase's wall time and peak memory (peaks reset at the phase's start)."""

    wall_s: float | None  # None only in the empty measure of a phase the cell did not run (CellRecord.phase)
    peak_rss_mib: float | None = None
    start_rss_mib: float | None = None
    end_rss_mib: float | None = None
    cuda_max_allocated_mib: float | None = None
    cuda_max_reserved_mib: float | None = None
    device_peak_mib: float | None = None    # what the driver reported (NVML): context and libraries included
    device_source: str | None = None        # "process" (this process's own) | "device" (used minus before)
    rss_method: str | None = None           # "hwm": the kernel's high-water mark, reset at the phase's start (exact);
                                            # "sampled": RSS read every 5 ms (a shorter spike can be missed)
    other_cpus: float | None = None         # CPUs busy with other work meanwhile (zobench.measure.load)
    cpu_s: float | None = None              # this process's CPU seconds in the phase (measure.load.OtherLoad)
    file_huge_mib: float | None = None      # mapped files held in 2 MiB pages at the phase's end (FilePmdMapped):
                                            # a mapped checkpoint's pages then count high (measure.memory)

    @classmethod
    def from_json(cls, d, name: str) -> "PhaseMeasure":
        if not isinstance(d, dict):
            raise SchemaError(f"field '{name}' = {shown_value(d)}: expected dict")
        d = dict(d)
        if "seconds" in d:  # schema 1
            d["wall_s"] = d.pop("seconds")
        if d.get("wall_s") is None:
            raise SchemaError(f"field '{name}' has no 'wall_s'")
        return cls(**{k: check_field(v, (str,) if k in ("device_source", "rss_method") else NUMBER, f"{name}.{k}")
                      for k, v in d.items() if k in _PHASE_FIELDS})

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


# Metrics with a known type; anything else a cell reports (quant_*, mask facts) is kept in ``extra``.
SCALARS = {
    "n_train": (int,), "n_dev": (int,), "n_test": (int,), "model_numel": (int,), "trainable_numel": (int,),
    "steps_done": (int,), "final_loss": NUMBER, "tokens_per_s": NUMBER, "density_obtained": NUMBER,
    "mask_nnz": (int,), "scope_numel": (int,), "sqgrad_mass_frac": NUMBER, "mask_build_s": NUMBER,
    "mask_cache_hit": (bool,), "restore_drift_frac_changed": NUMBER, "restore_drift_max_abs": NUMBER,
    "perturb_frac_changed": NUMBER,
    "best_step": (int,), "train_s": NUMBER, "tokens_per_step": NUMBER,
    "resumed_from_step": (int,), "segments": (int,), "packed": (bool,), "best_weights": (str,),
    "weights_init": (str,), "quant_streamed": (bool,),
}
STATS = ("step_s", "forward_ref_s", "step_over_ref")
MAPPINGS = ("test_before", "test_after", "truncated", "best_dev", "test_best", "zo_passes", "earlier_segments",
            "shape_warmup")
SERIES = ("loss_curve", "dev_curve", "trajectory", "segment_machines")


DEV_SCORES = ("accuracy", "em", "f1", "train_s")
# The fields of a mapping that reports read as numbers or lists (a record is data: each is checked on load)
_SCORES = {k: NUMBER for k in DEV_SCORES}
MAPPING_FIELDS = {"test_before": _SCORES, "test_after": _SCORES, "test_best": _SCORES, "best_dev": _SCORES,
                  "zo_passes": {"paths": (dict,), "pass_gb_s": NUMBER, "copy_gb_s": NUMBER, "pass_over_copy": NUMBER}}


def _check_dev_curve(points: list, name: str) -> None:
    """Each dev evaluation of a record: {step, and its scores} (reports read the step and the scores of every
    point, pilots' and cells' alike)."""
    for n, point in enumerate(points):
        where = f"{name}[{n}]"
        if not isinstance(point, dict):
            raise SchemaError(f"field '{where}' = {shown_value(point)}: expected dict")
        if point.get("step") is None:
            raise SchemaError(f"field '{where}.step' is missing: expected int")
        check_field(point["step"], (int,), f"{where}.step")
        for score in DEV_SCORES:
            check_field(point.get(score), NUMBER, f"{where}.{score}")


@dataclass
class Metrics:
    """What a cell measured besides phases. ``step_s``: the timed steps (warm-up excluded); ``step_parts_s``: perturb /
    forward_plus / forward_minus / update (ZO) or forward / backward / update; ``forward_ref_s``: an inference
    forward of each step's batch, right after the step (the denominator of step / two forwards);
    ``step_over_ref``: each such step over two of its reference forwards (the ratio per pair, so its spread is
    the measurement's, not the load's); ``test_before`` / ``test_after``: {accuracy} or {em, f1}; ``truncated``:
    inputs cut by max_length per split; ``dev_curve``: [{step, accuracy, train_s}] every ``eval_every`` steps,
    with ``best_step``, ``best_dev`` and ``test_best`` (test at the best dev step; ``best_weights``: how that
    step's weights came back: ``last``, ``kept`` in memory, ``disk``, or ``replay`` of the trajectory);
    ``trajectory``: each step's [[seed, coefficient], ...] (dense ZO: enough to rebuild the weights of any
    step); ``train_s``: training seconds, warm-up included; ``tokens_per_step``: input tokens of a timed step;
    ``tokens_per_s``: ``throughput()``, the mean timed step's tokens over the median step's seconds;
    ``packed``: with ``pack`` set, whether the model took packed rows (else its batches stayed padded);
    ``weights_init``: how a random model's values were drawn ("per-tensor philox"; absent where they came from
    the global ``torch.manual_seed``, before zobench.models.stream); ``quant_streamed``: the block linears were
    drawn in the quantize phase one at a time, each quantized before the next (the float model never whole);
    ``earlier_segments``: a resumed cell's earlier processes' {wall_s, cpu_s} up to their last checkpoint;
    ``segment_machines``: a resumed cell's machine for every segment, this one last (``measure.env.this_machine``),
    where its checkpoint kept them."""

    values: dict[str, Any] = field(default_factory=dict)      # SCALARS, MAPPINGS, SERIES
    step_s: Stats | None = None
    forward_ref_s: Stats | None = None
    step_over_ref: Stats | None = None
    step_parts_s: dict[str, Stats] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default=None):
        if key in STATS:
            return getattr(self, key) or default
        if key == "step_parts_s":
            return self.step_parts_s or default
        return self.values.get(key, self.extra.get(key, default))

    def throughput(self):
        """Input tokens a second of a typical timed step: the mean step's tokens over the median step's
        seconds, so that one stalled step (the process paused, the machine busy for a while) does not move
        it, as it would a total over total. Records made before ``tokens_per_step`` was kept give their
        ``tokens_per_s`` as recorded (tokens over seconds of all timed steps)."""
        per_step = self.values.get("tokens_per_step")
        if per_step is not None and self.step_s is not None and self.step_s.median > 0:
            return per_step / self.step_s.median
        return self.values.get("tokens_per_s")

    def accuracy(self, evaluation: str):
        """The accuracy of one evaluation (``test_after``, ``best_dev`` ...): None where it has none (a
        generative task's EM/F1, an evaluation that did not run)."""
        return _field(self.get(evaluation), "accuracy")

    def set(self, **items) -> None:
        for key, value in items.items():
            if key in STATS:
                if value is not None and not isinstance(value, Stats):  # readers use .median, never ["median"]
                    raise TypeError(f"metrics.{key}: expected Stats or None, got {type(value).__name__}")
                setattr(self, key, value)
            elif key == "step_parts_s":
                self.step_parts_s = value
            elif key in SCALARS or key in MAPPINGS or key in SERIES:
                self.values[key] = value
            else:
                self.extra[key] = value

    @classmethod
    def from_json(cls, d) -> "Metrics":
        check_field(d, (dict,), "metrics")
        m = cls()
        for key, value in d.items():
            name = f"metrics.{key}"
            if key in STATS:
                setattr(m, key, Stats.from_json(value, name))
            elif key == "step_parts_s":
                check_field(value, (dict,), name)
                m.step_parts_s = {k: s for k, v in (value or {}).items() if (s := Stats.from_json(v, f"{name}.{k}"))}
            elif key in SCALARS:
                m.values[key] = check_field(value, read_kinds(SCALARS[key]), name)
            elif key in MAPPINGS:
                m.values[key] = check_field(value, (dict,), name)
                for field_name, kinds in MAPPING_FIELDS.get(key, {}).items():
                    check_field((value or {}).get(field_name), kinds, f"{name}.{field_name}")
            elif key in SERIES:
                m.values[key] = check_field(value, (list,), name)
                if key == "dev_curve":
                    _check_dev_curve(value or [], name)
                elif key == "loss_curve":
                    for n, loss in enumerate(value or []):
                        check_field(loss, NUMBER, f"{name}[{n}]")
                elif key == "segment_machines":
                    for n, machine in enumerate(value or []):
                        check_field(machine, (str,), f"{name}[{n}]")
            else:
                m.extra[key] = value
        return m

    def to_json(self) -> dict:
        out = dict(self.values)
        for key in STATS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key).to_json()
        if self.step_parts_s:
            out["step_parts_s"] = {k: s.to_json() for k, s in self.step_parts_s.items()}
        out.update(self.extra)
        return out


@dataclass
class Execution:
    """Where and beside what a cell ran: concurrency skews timings, so every timing carries it."""

    executor: str = "local"
    node: str | None = None
    gpu: str | None = None              # CUDA_VISIBLE_DEVICES the cell saw ("" for none)
    concurrent_cells: int = 1           # cells running on this machine at once, this one included
    threads: int | None = None          # torch threads the cell ran with
    worker_pid: int | None = None       # the Ray worker that started the cell's process (ray executor)
    ray_imported: bool | None = None    # whether the cell's process had Ray loaded (it must not)
    span_s: list | None = None          # [start, end] of the cell's process, seconds since the epoch

    @classmethod
    def from_json(cls, d) -> "Execution | None":
        if d is None:
            return None
        check_field(d, (dict,), "execution")
        return cls(**{k: v for k, v in d.items() if k in _EXECUTION_FIELDS})

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_PHASE_FIELDS = frozenset(f.name for f in fields(PhaseMeasure))
_EXECUTION_FIELDS = frozenset(f.name for f in fields(Execution))


