"""Typed records: what one cell measured, written as one JSON line, readable without the code.

``CellRecord.to_json`` / ``CellRecord.from_json`` are the schema (``SCHEMA_VERSION``); ``from_json`` also
reads every earlier schema (v1: phase times under ``seconds``, ratios frozen under ``derived``) and checks
the type of every field it knows, naming the field when one is wrong. Records hold raw measurements only:
ratios against reference cells are derived when records are read (``zobench.results.derive``).

    cell_id          stable hash of the resolved config (the resume key)
    status           ok | failed | timeout | unsupported | lost (its Ray worker or node died, retries spent),
                     with ``reason`` (one line) otherwise
    config, labels   the resolved CellConfig, and the cell's matrix coordinates
    phases           {load|mask|quantize|eval_before|warmup|train|eval_after: PhaseMeasure}
    metrics          see ``Metrics``
    execution        which executor, node and GPU ran it, and how many cells shared the machine
    estimate         the predicted peak (``zobench estimate``) with its breakdown and calibration
    lr_choice        where a learning-rate pilot chose the lr: its grid, dev scores and choice
    artifact         where ``save`` kept the trained result, its kind and size (``zobench.cell.delta``)
    predictions      the per-example predictions of every evaluation: file, sha256 (``zobench.cell.predictions``)
    claims           the hash of the suite's declared claims when the cell ran (``zobench.spec.claims``)
    env, git         versions, hardware, threads, allocator settings; commit and dirty flag
    started_at, finished_at (ISO 8601 UTC, ``TIME_FORMAT``), wall_s, warnings
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, fields
from typing import Any

from zobench.errors import UserError

SCHEMA_VERSION = 2
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


# The phases the training estimate covers (a record's phase names; ``CellRecord.estimated_phase_mib``).
TRAIN_ESTIMATED = ("warmup", "train", "eval_before", "eval_after", "eval_best")

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
        try:
            return cls(*(check_field(d[k], NUMBER, f"{name}.{k}") for k in ("median", "p10", "p90")),
                       int(check_field(d.get("n", 0), NUMBER, f"{name}.n")))
        except KeyError as e:
            raise SchemaError(f"field '{name}' has no '{e.args[0]}'") from None

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
    other_cpus: float | None = None         # CPUs busy with other work meanwhile (zobench.measure.load)

    @classmethod
    def from_json(cls, d, name: str) -> "PhaseMeasure":
        if not isinstance(d, dict):
            raise SchemaError(f"field '{name}' = {shown_value(d)}: expected dict")
        d = dict(d)
        if "seconds" in d:  # schema 1
            d["wall_s"] = d.pop("seconds")
        if d.get("wall_s") is None:
            raise SchemaError(f"field '{name}' has no 'wall_s'")
        return cls(**{k: check_field(v, (str,) if k == "device_source" else NUMBER, f"{name}.{k}")
                      for k, v in d.items() if k in _PHASE_FIELDS})

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


# Metrics with a known type; anything else a cell reports (quant_*, mask facts) is kept in ``extra``.
SCALARS = {
    "n_train": (int,), "n_dev": (int,), "n_test": (int,), "model_numel": (int,), "trainable_numel": (int,),
    "steps_done": (int,), "final_loss": NUMBER, "tokens_per_s": NUMBER, "density_obtained": NUMBER,
    "mask_nnz": (int,), "scope_numel": (int,), "sqgrad_mass_frac": NUMBER, "mask_build_s": NUMBER,
    "mask_cache_hit": (bool,), "restore_drift_frac_changed": NUMBER, "restore_drift_max_abs": NUMBER,
    "best_step": (int,), "train_s": NUMBER, "tokens_per_step": NUMBER,
    "resumed_from_step": (int,), "segments": (int,), "packed": (bool,), "best_weights": (str,),
    "weights_init": (str,), "quant_streamed": (bool,),
}
STATS = ("step_s", "forward_ref_s", "step_over_ref")
MAPPINGS = ("test_before", "test_after", "truncated", "best_dev", "test_best", "zo_passes")
SERIES = ("loss_curve", "dev_curve", "trajectory")


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
    ``packed``: with ``pack`` set, whether the model took packed rows (else its batches stayed padded);
    ``weights_init``: how a random model's values were drawn ("per-tensor philox"; absent where they came from
    the global ``torch.manual_seed``, before zobench.models.stream); ``quant_streamed``: the block linears were
    drawn in the quantize phase one at a time, each quantized before the next (the float model never whole)."""

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
                m.step_parts_s = {k: s for k, v in value.items() if (s := Stats.from_json(v, f"{name}.{k}"))}
            elif key in SCALARS:
                m.values[key] = check_field(value, SCALARS[key] + ((float,) if SCALARS[key] == (int,) else ()), name)
            elif key in MAPPINGS:
                m.values[key] = check_field(value, (dict,), name)
            elif key in SERIES:
                m.values[key] = check_field(value, (list,), name)
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


TOP_TYPES = {"suite": (str,), "suite_file": (str,), "reason": (str,), "traceback_tail": (str,),
             "device": (str,), "model_source": (str,), "accuracy_meaningful": (bool,),
             "model_fallback_reason": (str,), "data_note": (str,), "started_at": (str,), "finished_at": (str,),
             "wall_s": NUMBER, "warnings": (list,), "estimate": (dict,), "env": (dict,), "git": (dict,),
             "labels": (dict,), "config": (dict,), "lr_choice": (dict,), "artifact": (dict,),
             "predictions": (dict,), "claims": (dict,)}


@dataclass
class CellRecord:
    cell_id: str
    status: str = "ok"
    config: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    suite: str | None = None
    suite_file: str | None = None
    reason: str | None = None
    traceback_tail: str | None = None
    device: str | None = None
    model_source: str | None = None
    accuracy_meaningful: bool = True
    model_fallback_reason: str | None = None
    data_note: str | None = None
    phases: dict[str, PhaseMeasure] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    estimate: dict | None = None
    lr_choice: dict | None = None       # the learning-rate pilot's grid, dev scores and choice
    artifact: dict | None = None        # what --save kept: path, kind, step, bytes (zobench.cell.delta)
    predictions: dict | None = None     # the per-example predictions file: path, sha256, evaluations
    claims: dict | None = None          # the hash of the suite's declared claims when it ran (spec.claims)
    execution: Execution | None = None
    env: dict = field(default_factory=dict)
    git: dict = field(default_factory=dict)
    started_at: str | None = None
    finished_at: str | None = None
    wall_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def method(self) -> str:
        return str(self.labels.get("method") or self.config.get("method") or "?")

    def phase(self, name: str) -> PhaseMeasure:
        """The phase's measure; where the cell did not run the phase, an empty one (every figure None)."""
        return self.phases[name] if name in self.phases else PhaseMeasure(wall_s=None)

    @property
    def estimated_peak_mib(self):
        """The estimator's peak for this cell (``zobench estimate``), None where it was not estimated."""
        return _field(self.estimate, "peak_mib")

    def estimated_phase_mib(self, phase: str):
        """The estimator's peak for one phase of this cell (load, mask, quantize; warm-up, train and the
        evaluations are its training estimate), None where it has none (older records: training only)."""
        phases = _field(self.estimate, "phases")
        key = "train" if phase in TRAIN_ESTIMATED else phase
        value = _field(phases, key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def estimated_weights_mib(self):
        """The weights' part of the estimate."""
        return _field(_field(self.estimate, "breakdown"), "weights_mib")

    @property
    def estimate_floor(self):
        """Where the estimate's framework floor came from: ``measured`` on this machine, or ``default``."""
        return _field(_field(self.estimate, "calibration"), "source")

    @property
    def artifact_bytes(self):
        """The size of what ``save`` kept, None where nothing was kept."""
        return _field(self.artifact, "bytes")

    def add_warning(self, text: str) -> None:
        self.warnings.append(text)

    @classmethod
    def from_json(cls, d) -> "CellRecord":
        """A record as written by any schema up to this one; ``SchemaError`` names a mistyped field."""
        if not isinstance(d, dict) or "cell_id" not in d:
            raise SchemaError("not a zobench record (no 'cell_id')")
        if not isinstance(d["cell_id"], str):
            raise SchemaError(f"field 'cell_id' = {shown_value(d['cell_id'])}: expected str")
        schema = d.get("schema", 1)
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise SchemaError(f"field 'schema' = {schema!r}: expected an integer schema version")
        if schema > SCHEMA_VERSION:
            raise SchemaError(f"schema {schema} is newer than this zobench ({SCHEMA_VERSION})")
        status = d.get("status", "ok")
        if status not in STATUSES:
            raise SchemaError(f"field 'status' = {status!r}: expected one of {', '.join(STATUSES)}")
        top = {k: check_field(d.get(k), kinds, k) for k, kinds in TOP_TYPES.items() if k in d}
        phases = check_field(d.get("phases"), (dict,), "phases") or {}
        return cls(cell_id=d["cell_id"], status=status, schema=SCHEMA_VERSION,
                   phases={p: PhaseMeasure.from_json(v, f"phases.{p}") for p, v in phases.items()},
                   metrics=Metrics.from_json(d.get("metrics") or {}),
                   execution=Execution.from_json(d.get("execution")),
                   **{k: (v if v is not None else _default(k)) for k, v in top.items()})

    def to_json(self) -> dict:
        out = {"schema": self.schema, "suite": self.suite, "suite_file": self.suite_file, "cell_id": self.cell_id,
               "labels": self.labels, "config": self.config, "status": self.status}
        for key in ("reason", "traceback_tail", "device", "model_source", "model_fallback_reason", "data_note"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["accuracy_meaningful"] = self.accuracy_meaningful
        out["phases"] = {p: m.to_json() for p, m in self.phases.items()}
        out["metrics"] = self.metrics.to_json()
        if self.execution is not None:
            out["execution"] = self.execution.to_json()
        if self.lr_choice is not None:
            out["lr_choice"] = self.lr_choice
        for key in ("artifact", "predictions", "claims"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(estimate=self.estimate, env=self.env, git=self.git, started_at=self.started_at,
                   finished_at=self.finished_at, wall_s=self.wall_s)
        if self.warnings:
            out["warnings"] = self.warnings
        return out


_PHASE_FIELDS = frozenset(f.name for f in fields(PhaseMeasure))
_EXECUTION_FIELDS = frozenset(f.name for f in fields(Execution))


def _default(key: str):
    return {"labels": {}, "config": {}, "env": {}, "git": {}, "warnings": [], "accuracy_meaningful": True}.get(key)
