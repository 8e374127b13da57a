"""An influence suite's run as a typed record, in the same schema family as a cell's (``cell.record``):
one JSON line marked ``kind: influence`` in a results file, read by ``results.load_influence``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zobench.cell.measures import NUMBER, STATUSES, SchemaError, check_field, read_kinds, shown_value
from zobench.cell.record import CellRecord

# -- an influence suite's run (``zobench.influence.bench``) ------------------------------------------------
# 2: seconds fields end in _s (cache_s, plain_s, finetune_s, phases' wall_s); the cache's sketch seed is
# sketch_seed and its every-parameter scope "all"; timestamps as cell records'. Schema 1 records are read
# and written back as they are (the report reads both).
INFLUENCE_SCHEMA = 2
# Its measurements, one mapping per phase (bench.py says what each holds), with the fields readers rely on.
INFLUENCE_SECTIONS = {
    "finetune": {"loss_first": NUMBER, "loss_last": NUMBER},
    "attack": {"triggered_success": NUMBER, "control_success": NUMBER},
    "caching": {}, "overhead": {},
    "quality": {"n": (int,), "n_poisoned": (int,), "base_rate": NUMBER, "by_k": (list,)},
    "fidelity": {"sweep": (list,)},
    "cost": {"k": (int,), "n": (int,), "bytes_per_example": (int,)},
    "top_example": {"row": (int,), "poisoned": (bool,)},
}
INFLUENCE_TOP = {"suite": (str,), "suite_file": (str,), "labels": (dict,), "config": (dict,), "zo": (dict,),
                 "phases": (dict,), "env": (dict,), "git": (dict,), "started_at": (str,), "finished_at": (str,),
                 "wall_s": NUMBER}


def _typed(d: Any, name: str, fields_: dict) -> dict:
    """``d``'s fields named in ``fields_`` (name -> kinds; a kind tuple ending in None: optional), checked."""
    if not isinstance(d, dict):
        raise SchemaError(f"field '{name}' = {shown_value(d)}: expected dict")
    out = {}
    for key, kinds in fields_.items():
        optional = kinds[-1] is None
        kinds = tuple(k for k in kinds if k is not None)
        if key not in d:
            if optional:
                continue
            raise SchemaError(f"field '{name}' has no '{key}'")
        if d[key] is None and not optional:
            raise SchemaError(f"field '{name}.{key}' is null: expected {' or '.join(k.__name__ for k in kinds)}")
        out[key] = check_field(d[key], read_kinds(kinds), f"{name}.{key}")
    return out


@dataclass(frozen=True)
class Retrieval:
    """One query set's retrieval at one K (``influence.metrics``): means over queries of recall and precision
    at k and of AUROC, and the lowest single query's recall (records before it was kept have none)."""

    recall_at_k: float
    precision_at_k: float
    auroc: float
    recall_min: float | None = None

    @classmethod
    def from_json(cls, d, name: str) -> "Retrieval":
        return cls(**_typed(d, name, {"recall_at_k": NUMBER, "precision_at_k": NUMBER, "auroc": NUMBER,
                                      "recall_min": NUMBER + (None,)}))


@dataclass(frozen=True)
class QualityAtK:
    """The quality table's row at one sketch size K: triggered queries, the hotword's tokens, clean control."""

    k: int
    triggered: Retrieval
    hotword: Retrieval
    control: Retrieval

    @classmethod
    def from_json(cls, d, name: str) -> "QualityAtK":
        k = _typed(d, name, {"k": (int,)})["k"]
        return cls(int(k), *(Retrieval.from_json(d.get(q), f"{name}.{q}") for q in ("triggered", "hotword", "control")))


@dataclass(frozen=True)
class FidelityPoint:
    """Sketched against exact scores at one setting: Spearman's rho and the top-10 overlap, means over queries."""

    normalize: bool
    permute: bool
    k: int
    spearman: float
    topk_overlap: float

    @classmethod
    def from_json(cls, d, name: str) -> "FidelityPoint":
        f = _typed(d, name, {"normalize": (bool,), "permute": (bool,), "k": (int,), "spearman": NUMBER,
                             "topk_overlap": NUMBER})
        return cls(f["normalize"], f["permute"], int(f["k"]), f["spearman"], f["topk_overlap"])


@dataclass
class InfluenceRecord:
    """An influence suite's run, one JSON line marked ``kind: influence``: its resolved settings (``config``),
    one mapping of results per phase (``INFLUENCE_SECTIONS``; ``zo`` when the suite has a sparse-ZO arm), each
    phase's wall time and peak memory (``measure.phases``), the environment and the git state. ``from_json``
    reads every schema up to ``INFLUENCE_SCHEMA`` and names a mistyped field; ``to_json`` writes a record back
    as it was read."""

    cell_id: str
    suite: str | None = None
    suite_file: str | None = None
    labels: dict = field(default_factory=dict)
    status: str = "ok"
    config: dict = field(default_factory=dict)
    sections: dict[str, dict] = field(default_factory=dict)
    zo: dict | None = None
    phases: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    git: dict = field(default_factory=dict)
    started_at: str | None = None
    finished_at: str | None = None
    wall_s: float | None = None
    schema: int = INFLUENCE_SCHEMA

    @classmethod
    def from_json(cls, d) -> "InfluenceRecord":
        if not isinstance(d, dict) or d.get("kind") != "influence" or "cell_id" not in d:
            raise SchemaError("not an influence record (no 'kind: influence' and 'cell_id')")
        check_field(d["cell_id"], (str,), "cell_id")
        schema = d.get("schema", 1)
        if not isinstance(schema, int) or isinstance(schema, bool) or not 1 <= schema <= INFLUENCE_SCHEMA:
            raise SchemaError(f"field 'schema' = {schema!r}: expected an influence schema up to {INFLUENCE_SCHEMA}")
        if d.get("status", "ok") not in STATUSES:
            raise SchemaError(f"field 'status' = {d.get('status')!r}: expected one of {', '.join(STATUSES)}")
        sections = {}
        for name, typed in INFLUENCE_SECTIONS.items():
            if name not in d:
                raise SchemaError(f"influence record without '{name}'")
            _typed(d[name], name, typed)
            sections[name] = d[name]  # kept as read, for writing back
        top = {k: check_field(d[k], kinds, k) for k, kinds in INFLUENCE_TOP.items() if d.get(k) is not None}
        rec = cls(cell_id=d["cell_id"], status=d.get("status", "ok"), schema=schema, sections=sections, **top)
        # the typed parts are read now, so that a mistyped one is named here, not in the report
        rec.fine_tunes(), rec.quality_by_k(), rec.quality_by_k(zo=True), rec.fidelity_sweep()
        return rec

    def quality_by_k(self, zo: bool = False) -> list[QualityAtK]:
        """The quality table, one row per K: of the LoRA fine-tune, or of the sparse-ZO arm (``zo``; none
        where the suite has no such arm)."""
        if zo and not self.zo:
            return []
        quality, name = (self.zo.get("quality"), "zo.quality") if zo else (self.sections["quality"], "quality")
        rows = _typed(quality, name, {"by_k": (list, None)}).get("by_k") or []
        return [QualityAtK.from_json(e, f"{name}.by_k[{i}]") for i, e in enumerate(rows)]

    def fidelity_sweep(self) -> list[FidelityPoint]:
        """Sketched against exact scores, one point per (normalize, permute, K)."""
        sweep = _typed(self.sections["fidelity"], "fidelity", {"sweep": (list,)})["sweep"]
        return [FidelityPoint.from_json(e, f"fidelity.sweep[{i}]") for i, e in enumerate(sweep)]

    def fine_tunes(self) -> list[tuple[str, CellRecord]]:
        """The fine-tunes this run trained, as the cells they ran as (``influence.train``): (arm, its typed
        record). Records from before the fine-tunes were cells have none."""
        zo_train = (self.zo or {}).get("train")
        arms = [("LoRA", "finetune.cell", self.sections["finetune"].get("cell")),
                ("sparse ZO", "zo.train.cell", zo_train.get("cell") if isinstance(zo_train, dict) else None)]
        out = []
        for arm, where, cell in arms:
            if cell is not None:
                try:
                    out.append((arm, CellRecord.from_json(cell)))
                except SchemaError as e:
                    raise SchemaError(f"{where}: {e}") from None
        return out

    def to_json(self) -> dict:
        return {"schema": self.schema, "kind": "influence", "suite": self.suite, "suite_file": self.suite_file,
                "cell_id": self.cell_id, "labels": self.labels, "status": self.status, "config": self.config,
                **self.sections, **({"zo": self.zo} if self.zo else {}), "phases": self.phases, "env": self.env,
                "git": self.git, "started_at": self.started_at, "finished_at": self.finished_at,
                "wall_s": self.wall_s}
