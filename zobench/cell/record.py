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

from dataclasses import dataclass, field

from zobench.cell.measures import (
    NUMBER,
    STATUSES,
    Execution,
    Metrics,
    PhaseMeasure,
    SchemaError,
    _field,
    check_field,
    estimate_key,
    shown_value,
)

SCHEMA_VERSION = 2

TOP_TYPES = {"suite": (str,), "suite_file": (str,), "reason": (str,), "traceback_tail": (str,),
             "device": (str,), "model_source": (str,), "accuracy_meaningful": (bool,),
             "model_fallback_reason": (str,), "data_note": (str,), "started_at": (str,), "finished_at": (str,),
             "wall_s": NUMBER, "warnings": (list,), "estimate": (dict,), "env": (dict,), "git": (dict,),
             "labels": (dict,), "config": (dict,), "lr_choice": (dict,), "artifact": (dict,),
             "predictions": (dict,), "claims": (dict,)}
# Fields inside those sections that reports read as they are: each of its type, checked on load
SECTION_FIELDS = {
    "env": {"python": (str,), "platform": (str,), "cpu": (str,), "cpu_flags": (list,), "cpu_count": (int,),
            "torch_threads": (int,), "malloc_mmap_threshold": (str,), "versions": (dict,), "malloc": (dict,),
            "gpu": (str,), "gpu_count": (int,), "cuda": (str,), "driver": (str,), "gpu_memory_mib": (int,),
            "cuda_alloc_conf": (str,)},
    "lr_choice": {"grid": (list,), "dev": (list,), "pilot_steps": (int,), "by": (str,), "chosen": NUMBER},
}


def _check_lr_choice(choice: dict | None) -> None:
    """What the learning-rate table reads of a pilot's choice: its grid (numbers), one dev score (a number,
    or none for a pilot that failed) per lr, and its pilot steps."""
    if not choice:
        return
    for key in ("grid", "dev", "pilot_steps"):
        if choice.get(key) is None:
            raise SchemaError(f"field 'lr_choice' has no '{key}'")
    if len(choice["grid"]) != len(choice["dev"]):
        raise SchemaError("field 'lr_choice': expected one dev score per lr of its grid")
    for n, (lr, dev) in enumerate(zip(choice["grid"], choice["dev"])):
        if lr is None:
            raise SchemaError(f"field 'lr_choice.grid[{n}]' is null: expected a number")
        check_field(lr, NUMBER, f"lr_choice.grid[{n}]")
        check_field(dev, NUMBER, f"lr_choice.dev[{n}]")


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
    def cpu_s(self):
        """The cell's own CPU seconds, its phases summed: what it cost, however busy the machine was or however
        long the run was stopped; a resumed cell's earlier segments counted up to their last checkpoint. None
        for records from before phases kept it."""
        spent = [m.cpu_s for m in self.phases.values() if m.cpu_s is not None]
        return sum(spent) + self._earlier("cpu_s") if spent else None

    @property
    def machine_s(self):
        """Wall seconds the cell held the machine: this run's, and a resumed cell's earlier segments' up to
        their last checkpoint. Stopped or shared time included."""
        return None if self.wall_s is None else self.wall_s + self._earlier("wall_s")

    def _earlier(self, key: str) -> float:
        value = _field(self.metrics.get("earlier_segments"), key)
        return value if type(value) in NUMBER and 0 <= value < float("inf") else 0.0

    @property
    def estimated_peak_mib(self):
        """The estimator's peak for this cell (``zobench estimate``), None where it was not estimated."""
        return _field(self.estimate, "peak_mib")

    @property
    def mask_cached(self) -> bool:
        """Whether the cell's mask was read from zobench's mask cache: its mask phase then computed nothing."""
        return self.metrics.get("mask_cache_hit") is True

    def estimated_phase_mib(self, phase: str):
        """The estimator's peak for one phase of this cell (load, mask, quantize, eval; warm-up and train are
        its training estimate: ``measures.estimate_key``), None where it has none (older records: training
        only). The quantize phase after a mask read from the cache is priced as such, where the estimate
        says what that changes (``phases_if_mask_cached``)."""
        if self.mask_cached:
            cached = self._phase_estimate("phases_if_mask_cached", phase)
            if cached is not None:
                return cached
        return self._phase_estimate("phases", phase)

    def estimated_host_mib(self, phase: str):
        """A GPU cell's estimated host memory for one phase (``analysis.phase_estimate.host_phases``), None
        where the estimate has none (CPU cells: their phases are host memory already; older records)."""
        return self._phase_estimate("host_phases", phase)

    def _phase_estimate(self, field: str, phase: str):
        """``phase``'s number in the estimate's ``field`` (a mapping of phase to MiB), None where it is missing
        or not a number (a record is data)."""
        phases = _field(self.estimate, field)
        value = _field(phases, estimate_key(phase, phases if isinstance(phases, dict) else None))
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
        for section, fields in SECTION_FIELDS.items():
            for name, kinds in fields.items():
                check_field((top.get(section) or {}).get(name), kinds, f"{section}.{name}")
        _check_lr_choice(top.get("lr_choice"))
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


def _default(key: str):
    return {"labels": {}, "config": {}, "env": {}, "git": {}, "warnings": [], "accuracy_meaningful": True}.get(key)
