"""Declared claims decided from records: which records make each arm, which runs failed, the evidence read from
the per-example predictions beside the records, and the verdicts (``zobench.analysis.stats``).

    verdicts(records, claims, results_dir) -> Decision

An arm is the ok, non-pilot records matching its selector, one per seed (a cell's latest record). A run that
failed by the claims' declared rule (``spec.claims.FailedIf``: test accuracy at the majority rate, a loss
that diverged) is left out of its arm and listed: a failed run is not a property of its method; a suite that
declares ``count_in_arm`` keeps it in its arm at what it measured, and lists it.
Accuracy claims read each run's per-example correctness at the claim's metric (``test_best``: test at the best
dev step; ``test_after``: at the last) from its predictions file, checked against the sha256 its record holds,
and aligned by example id; a run without predictions (recorded before they were kept) cannot be paired and is
listed as such. Speed claims read each run's dev curve in the claim's clock (``spec.claims``): ``step_forwards``
(steps times the run's median step over two of its own forwards, ``step_over_ref``, timed side by side, so
load cancels), ``train_s`` (training seconds), or ``reference_forwards`` (those seconds over the run's median
two-forward time: load that varies during a run stretches it). An arm holds one run per seed: a selector that
matches two runs of one seed (say a float and an NF4 cell) leaves its claim undecided, with that said.

Records carry the claims their suite declared when they ran (``record.claims``): when those differ from the
claims given here (a claim edited after data existed), ``Decision.earlier`` holds the verdicts under each
earlier declaration too, so a report shows both, labelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zobench.analysis.design import Resolution, failed_run, resolution
from zobench.analysis.speed import faster_to_target
from zobench.analysis.stats import Evidence, Result, accuracy_difference, align, decide
from zobench.cell.predictions import SHA256
from zobench.cell.predictions import read as read_predictions
from zobench.cell.record import CellRecord
from zobench.errors import UserError
from zobench.results import latest_by_cell
from zobench.spec.claims import Claim, FailedIf, claims_hash, finite_number, parse_claims
from zobench.spec.selectors import selector_matches


@dataclass(frozen=True)
class Listed:
    """A run (or a claim's arms) a decision left out or counted as failed: ``where`` names the claim and arm
    ("sens-vs-random, arm a"), ``what`` the run and why. Reads as one line, "where: what"; a report can
    group the claims one run is listed under (a shared arm's failed run is in every claim of that arm)."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"

    def __contains__(self, text: str) -> bool:
        return text in str(self)


@dataclass
class Decision:
    claims_hash: str
    results: list[Result]
    arms: dict[str, dict[str, list[str]]]            # claim id -> {"a": [cell ids], "b": [...]}
    excluded: list[Listed] = field(default_factory=list)  # every run left out, and why
    counted: list[Listed] = field(default_factory=list)   # failed runs kept in their arm (failed_if.count_in_arm)
    earlier: dict[str, list[Result]] = field(default_factory=dict)  # claims hash -> verdicts as declared then
    earlier_claims: dict[str, list[Claim]] = field(default_factory=dict)  # claims hash -> the claims declared then
    earlier_undecided: list[str] = field(default_factory=list)      # hashes past MAX_EARLIER, named only
    # accuracy claim id -> what its design resolves, from its own runs (design.resolution; 2+ seeds paired)
    resolutions: dict[str, Resolution] = field(default_factory=dict)


# Earlier declarations decided again on the same records, the first met first: each costs a whole decision,
# and a results file is data (a file whose every record declared its own claims would cost records^2).
MAX_EARLIER = 4
FAMILY = ("alpha", "correction", "resamples", "seed", "failed_if")  # a declared claim's settings shared by all


def claims_of(rec: CellRecord) -> list[Claim] | None:
    """The claims a record's suite declared when it ran (None for records from before claims were kept),
    validated as a suite's ``claims:`` section is (``spec.claims.parse_claims``): a results file is data, and a
    declaration that is not one zobench wrote is refused in one line."""
    declared = (rec.claims or {}).get("declared")
    if not declared:
        return None
    where = f"record {rec.cell_id}: claims.declared"
    if not isinstance(declared, list) or not all(isinstance(d, dict) for d in declared):
        raise UserError(f"{where}: expected a list of declared claims")
    section = {k: declared[0].get(k) for k in FAMILY}
    failed_if = section["failed_if"] or {}
    if not isinstance(failed_if, dict):
        raise UserError(f"{where}: failed_if: expected a mapping")
    section["failed_if"] = {k: v for k, v in failed_if.items() if v is not None}
    section["items"] = [{k: v for k, v in d.items() if k not in FAMILY and v is not None} for d in declared]
    return parse_claims(section, where)


def runs(records: list[CellRecord], selector: dict) -> list[CellRecord]:
    """The ok, non-pilot records of one arm, one per cell (its latest), in seed order."""
    chosen = [r for r in latest_by_cell(records) if r.ok and r.labels.get("stage") != "pilot"
              and selector_matches(selector, {**r.config, **r.labels})]
    return sorted(chosen, key=lambda r: (seed_of(r), r.cell_id))


def seed_of(rec: CellRecord) -> int:
    seed = rec.config.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"record {rec.cell_id}: config.seed: expected a whole number, got {seed!r}"[:300])
    return seed


def _label(r: CellRecord) -> str:
    """The run's cell id, method, quantization where it has one (one suite may run a method on several), seed."""
    quant = r.config.get("quant")
    on = f" on {quant}" if quant not in (None, "none") else ""
    return f"{r.cell_id} ({r.method}{on}, seed {r.config.get('seed')})"


class Reader:
    """Per-example predictions of records, read once each, from inside the results folder and checked
    against the sha256 the record names. A record is data: its description of the file is checked first (a
    path that leaves the folder, or no hash, is refused in one line), and so is every array a verdict reads."""

    def __init__(self, results_dir: Path):
        self.dir, self.cache = Path(results_dir), {}

    def evaluation(self, rec: CellRecord, name: str) -> dict | None:
        """One evaluation's arrays as a verdict reads them (classification: ``_checked``)."""
        fields = self.fields(rec, name)
        return None if fields is None else _checked(fields, f"record {rec.cell_id}: predictions {name}")

    def fields(self, rec: CellRecord, name: str) -> dict | None:
        """One evaluation's arrays as kept (any task), from the file the record names and vouches for."""
        p, where = rec.predictions, f"record {rec.cell_id}: predictions"
        if not p:
            return None
        names = p.get("evaluations")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{where}.evaluations: expected a list of evaluation names")
        if name not in names:
            return None
        if rec.cell_id not in self.cache:
            self.cache[rec.cell_id] = read_predictions(self._path(p.get("path"), where), self._sha(p, where))
        return self.cache[rec.cell_id].get(name)

    def _path(self, path, where: str) -> Path:
        if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
            raise UserError(f"{where}.path: expected a path inside the results folder, got {path!r}"[:300])
        full = self.dir / path
        if not full.resolve().is_relative_to(self.dir.resolve()):
            raise UserError(f"{where}.path: {path} leads outside the results folder (a link)"[:300])
        return full

    @staticmethod
    def _sha(p: dict, where: str) -> str:
        sha = p.get("sha256")
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            raise UserError(f"{where}.sha256: expected the file's sha256 (64 hex digits)")
        return sha


def _checked(fields: dict, where: str) -> dict:
    """An evaluation's arrays as the verdicts read them: ``id``, ``gold`` and ``pred`` one value per example,
    gold and pred whole numbers (class indices), gold not negative."""
    arrays = {k: fields[k] for k in ("id", "gold", "pred") if k in fields}
    if any(a.ndim != 1 for a in arrays.values()) or len({len(a) for a in arrays.values()}) > 1:
        raise UserError(f"{where}: id, gold and pred must hold one value per example")
    for k in ("gold", "pred"):
        a = arrays.get(k)
        if a is not None and (a.dtype.kind not in "biu" or (k == "gold" and a.size and int(a.min()) < 0)):
            raise UserError(f"{where}: {k} must hold class indices (whole numbers >= 0), not {a.dtype}")
    return fields


def majority_rate(details: dict) -> float:
    gold = np.asarray(details["gold"])
    # counts of the values present (np.unique), not a bin per class up to the largest: a file's gold of 10**12
    # would ask bincount for terabytes
    return float(np.unique(gold, return_counts=True)[1].max() / len(gold)) if len(gold) else 1.0


def _failed(rec: CellRecord, details: dict | None, rule: FailedIf) -> str | None:
    score = rec.metrics.get("test_best") or rec.metrics.get("test_after")
    test = score.get("accuracy") if isinstance(score, dict) else None
    test = test if finite_number(test) else None  # a score that is not a number is no score: the run failed
    majority = majority_rate(details) if details is not None and "gold" in details else 0.5
    return failed_run(test, majority, rec.metrics.get("loss_curve"), rule)


def _test_details(rec: CellRecord, reader: Reader) -> dict | None:
    """The run's per-example test predictions (for the majority rate of its test set), at either metric."""
    return reader.evaluation(rec, "test_best") or reader.evaluation(rec, "test_after")


def _one_per_seed(side: str, arm: list[CellRecord]) -> None:
    """An arm is one configuration: a selector that matches two runs of one seed (a float and an NF4 cell,
    say) would have one of them dropped, so it is refused."""
    seen: dict = {}
    for rec in arm:
        seed = seed_of(rec)
        if seed in seen:
            raise ValueError(f"arm {side} matches two runs of seed {seed} ({_label(seen[seed])}, {_label(rec)}): "
                             f"narrow its selector (e.g. with quant) so that an arm is one configuration")
        seen[seed] = rec


def _leave_out(claim: Claim, side: str, rec: CellRecord, failed: str | None, missing: str | None,
               lists: tuple[list, list]) -> bool:
    """Whether a run leaves its arm: one without what the claim reads always does; a failed one unless the
    rule counts failures in their arms. Either way it is listed (``lists``: excluded, counted)."""
    excluded, counted = lists
    if missing:
        excluded.append(Listed(f"{claim.id}, arm {side}", f"{_label(rec)}: {missing}"))
        return True
    if failed and claim.failed_if.count_in_arm:
        counted.append(Listed(f"{claim.id}, arm {side}", f"{_label(rec)}: {failed}"))
        return False
    if failed:
        excluded.append(Listed(f"{claim.id}, arm {side}", f"{_label(rec)}: {failed}"))
    return bool(failed)


def _accuracy(claim: Claim, a: dict, b: dict) -> Evidence:
    if not a or not b:
        return Evidence(None, (len(a), len(b)), None, "an arm has no usable run")
    return accuracy_difference(a, b, resamples=claim.resamples, seed=claim.seed)


def _correct(claim: Claim, arm_a: list, arm_b: list, reader: Reader, lists: tuple[list, list]) -> tuple[dict, dict]:
    correct, ids = {"a": {}, "b": {}}, None
    for side, arm in (("a", arm_a), ("b", arm_b)):
        for rec in arm:
            details = reader.evaluation(rec, claim.metric)
            missing = None if details is not None else \
                f"no per-example predictions for {claim.metric} (recorded before they were kept)"
            if _leave_out(claim, side, rec, _failed(rec, details, claim.failed_if), missing, lists):
                continue
            if not {"id", "gold", "pred"} <= set(details):
                raise UserError(f"record {rec.cell_id}: predictions {claim.metric}: an accuracy claim needs its "
                                f"id, gold and pred arrays")
            if ids is None:
                ids = np.sort(details["id"])
            correct[side][seed_of(rec)] = align(ids, details["id"], details["pred"] == details["gold"], _label(rec))
    return correct["a"], correct["b"]


def curve(rec: CellRecord, clock: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A run's dev curve as (times, accuracies) in ``clock``; None when it has none (or no reference)."""
    points = rec.metrics.get("dev_curve") or []
    key = "step" if clock == "step_forwards" else "train_s"
    if not isinstance(points, list) or not points or not all(
            isinstance(p, dict) and all(finite_number(p.get(k)) for k in (key, "accuracy")) for p in points):
        return None  # none, or not one zobench wrote: the run has no curve in this clock (and is listed so)
    if clock == "step_forwards":
        ratio = rec.metrics.step_over_ref
        if not ratio:
            return None
        times = np.array([p["step"] for p in points], dtype=float) * ratio.median
    else:
        times = np.array([p["train_s"] for p in points], dtype=float)
    if clock == "reference_forwards":
        ref = rec.metrics.forward_ref_s
        if not ref:
            return None
        times = times / (2 * ref.median)
    return times, np.array([p["accuracy"] for p in points], dtype=float)


def _speed(claim: Claim, arm_a: list, arm_b: list, reader: Reader, lists: tuple[list, list]) -> Evidence:
    curves = {"a": {}, "b": {}}
    for side, arm in (("a", arm_a), ("b", arm_b)):
        for rec in arm:
            c = curve(rec, claim.clock or "train_s")
            missing = None if c is not None else f"no dev curve in clock {claim.clock}"
            if _leave_out(claim, side, rec, _failed(rec, _test_details(rec, reader), claim.failed_if), missing,
                          lists):
                continue
            curves[side][seed_of(rec)] = c
    if not curves["a"] or not curves["b"]:
        return Evidence(None, (len(curves["a"]), len(curves["b"])), None, "an arm has no usable run")
    return faster_to_target(curves["a"], curves["b"], claim.target, resamples=claim.resamples, seed=claim.seed)


def _decide(records: list[CellRecord], claims: list[Claim], reader: Reader):
    evidence, arms, excluded, counted, resolved = {}, {}, [], [], {}
    for c in claims:
        a, b = runs(records, c.a), runs(records, c.b)
        arms[c.id] = {"a": [r.cell_id for r in a], "b": [r.cell_id for r in b]}
        try:
            _one_per_seed("a", a)
            _one_per_seed("b", b)
            if c.kind == "faster_to_target":
                evidence[c.id] = _speed(c, a, b, reader, (excluded, counted))
                continue
            correct_a, correct_b = _correct(c, a, b, reader, (excluded, counted))
            evidence[c.id] = _accuracy(c, correct_a, correct_b)
        except ValueError as e:  # runs that cannot be paired (other test examples, a seed twice): said, not decided
            excluded.append(Listed(c.id, str(e)))
            evidence[c.id] = Evidence(None, (len(a), len(b)), None, f"not decided: {e}")
            continue
        try:
            resolved[c.id] = resolution(correct_a, correct_b)
        except ValueError:  # under 2 seeds paired: nothing to project from
            pass
    return decide(claims, evidence), arms, excluded, counted, resolved


def verdicts(records: list[CellRecord], claims: list[Claim], results_dir: str | Path) -> Decision | None:
    """The verdict of every declared claim (see the module docstring); None when none is declared."""
    if not claims:
        return None
    reader = Reader(Path(results_dir))
    try:
        results, arms, excluded, counted, resolved = _decide(records, claims, reader)
    except UserError as e:
        raise UserError(f"claims: {e}") from None
    decision = Decision(claims_hash(claims), results, arms, excluded, counted, resolutions=resolved)
    for rec in records:
        then = claims_of(rec)
        if then and (h := claims_hash(then)) != decision.claims_hash and h not in decision.earlier \
                and h not in decision.earlier_undecided:
            if len(decision.earlier) < MAX_EARLIER:
                decision.earlier[h] = _decide(records, then, reader)[0]
                decision.earlier_claims[h] = then
            else:
                decision.earlier_undecided.append(h)
    return decision
