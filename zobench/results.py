"""Results files: one JSON line per cell record, appended atomically; loading, the ratios derived when records
are read, and a pandas view.

    results/<suite>.jsonl     one ``CellRecord`` per line (``zobench.cell.record``: the schema)

Appends write the whole line or nothing (``zobench.files.append_line``: short writes are completed, a
failed write is rolled back), so a killed run or a full disk leaves either the full line or none. Reading
skips (and reports) a torn last line and refuses a file with a bad line anywhere else, naming it.

    import zobench.results
    df = zobench.results.to_pandas("results/smollm2.jsonl")   # one row per cell, ratios derived on read

The derived ratios (``derive``, see ``Derived``) are a pure function of the whole set of records, never
frozen into a record at write time. They live here, in the ground beside the files they read, so that
every reader (check, report, the pandas view) takes them from one place and this module imports nothing
above it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from zobench.cell.influence_record import InfluenceRecord
from zobench.cell.measures import SchemaError
from zobench.cell.record import CellRecord
from zobench.errors import NotJSON, UserError
from zobench.files import MAX_RECORD_BYTES, append_line, gc_paused, parse_json, text_lines
from zobench.gates.pandas import data_frame
from zobench.spec import catalog
from zobench.spec.matrix import key_part, reference_key

__all__ = ["append_record", "load_records", "read_json_lines", "latest_by_cell", "derive", "Derived", "to_pandas",
           "flatten"]


def append_record(path: str | Path, record: CellRecord | dict) -> None:
    """Append one record as one JSON line: the whole line or nothing."""
    data = record.to_json() if isinstance(record, CellRecord) else record
    append_line(path, (json.dumps(data, default=str, allow_nan=False) + "\n").encode())


def read_json_lines(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every line of a results file (see the module docstring)."""
    with gc_paused():
        return list(_json_lines(Path(path)))


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """``read_json_lines`` one line at a time: a line is parsed when the next one has been read, so that the
    last line, where an interrupted append leaves a torn one, is known as the last."""
    held = None
    for n, line in text_lines(path, "results file", MAX_RECORD_BYTES):
        if held is not None:
            yield _parse_line(path, *held, last=False)
        held = (n, line) if line.strip() else None
    if held is not None and (parsed := _parse_line(path, *held, last=True)) is not None:
        yield parsed


def _parse_line(path: Path, n: int, line: str, last: bool) -> tuple[int, dict] | None:
    try:
        obj = parse_json(line, f"{path}:{n}")
    except NotJSON as e:
        if last and not line.endswith("\n"):  # an append that was cut short
            print(f"zobench: warning: {path}:{n}: skipped a torn last line (an interrupted append)",
                  file=sys.stderr)
            return None
        raise UserError(f"{path}:{n}: not a JSON record ({e.detail}); the results file is corrupt") from None
    if not isinstance(obj, dict) or "cell_id" not in obj:
        raise UserError(f"{path}:{n}: not a zobench record (no 'cell_id')")
    return n, obj


def is_influence(obj: dict) -> bool:
    return obj.get("kind") == "influence"


def load_records(path: str | Path) -> list[CellRecord]:
    """The typed records of a suite's results file, in file order (each line typed as it is read: the
    parsed JSON of 100,000 records is never held at once)."""
    out = []
    with gc_paused():
        for n, obj in _json_lines(Path(path)):
            if is_influence(obj):
                raise UserError(f"{path}:{n}: an influence suite's record; `zobench report {path}` renders it")
            try:
                out.append(CellRecord.from_json(obj))
            except SchemaError as e:
                raise UserError(f"{path}:{n}: {e}") from None
    return out


def load_influence(path: str | Path) -> list[InfluenceRecord]:
    """The typed influence records of a results file (an influence suite's), in file order."""
    out = []
    for n, obj in read_json_lines(path):
        if is_influence(obj):
            try:
                out.append(InfluenceRecord.from_json(obj))
            except SchemaError as e:
                raise UserError(f"{path}:{n}: {e}") from None
    return out


def flatten(rec: CellRecord, derived: dict) -> dict:
    """One flat row: labels, status, key metrics, phase peaks and times, derived ratios, the estimate."""
    m = rec.metrics
    row = {"suite": rec.suite, "cell_id": rec.cell_id, "status": rec.status, "reason": rec.reason}
    row.update(rec.labels)
    row["tokens_per_s"] = m.throughput()
    for key in ("final_loss", "density_obtained", "mask_nnz", "sqgrad_mass_frac",
                "restore_drift_frac_changed", "restore_drift_max_abs", "perturb_frac_changed"):
        row[key] = m.get(key)
    for when in ("test_before", "test_after"):
        for k, v in (m.get(when) or {}).items():
            row[f"{when}_{k}"] = v
    if m.step_s:
        row.update({f"step_{k}_s": v for k, v in m.step_s.to_json().items() if k != "n"}, steps_timed=m.step_s.n)
    for part, stats in m.step_parts_s.items():
        row[f"{part}_median_s"] = stats.median
    for phase, measure in rec.phases.items():
        for k, v in measure.to_json().items():
            row[f"{phase}_{k}"] = v
    row.update(derived)
    if rec.execution is not None:
        row["concurrent_cells"] = rec.execution.concurrent_cells
    if rec.estimate and "peak_mib" in rec.estimate:
        row["estimated_peak_mib"] = rec.estimate["peak_mib"]
    return row


def to_pandas(path_or_records: str | Path | Iterable[CellRecord]):
    """Records as a DataFrame, one row per cell (latest record wins), with the derived ratios."""
    recs = load_records(path_or_records) if isinstance(path_or_records, (str, Path)) else list(path_or_records)
    derived = derive(recs)
    return data_frame([flatten(r, derived[r.cell_id].to_dict()) for r in latest_by_cell(recs)])


# -- ratios derived on read -------------------------------------------------------------------------------
TRAIN_PHASES = ("warmup", "train")

SPEEDUP_BASELINE = "full"  # the method speedups are measured against (MeZO)


@dataclass
class Derived:
    """Ratios derived from a set of records when they are read:

    peak_mib                the training peak of warm-up/train: on a GPU the device memory the driver reported
                            (NVML) where recorded, else CUDA max allocated; on a CPU peak RSS
    peak_kind               which of those it is: device | allocated | rss
    cell_peak_mib           the whole cell's peak of the same kind: the largest over every phase it measured
                            (load, mask, quantize, evaluations too), and ``cell_peak_phase``, the phase
    peak_over_inference     peak_mib over the forward reference cell's
    step_over_two_forwards  a step over two inference forwards: the median of the cell's per-pair ratios
                            (each timed step over two forwards timed right after it, ``forward_ref``
                            "in-cell pairs"; ``step_over_two_forwards_p10`` / ``_p90`` their spread), else
                            the step median over two of the in-cell forwards' median (records before the
                            pairs: "in-cell"), else over the forward reference cell's (``forward_ref``
                            "forward cell")
    step_timing             "fault" where a step measured below two forwards in 9 pairs of 10 (p90 < 1: the
                            step and its forwards did not see the same machine; the ratio is not a figure),
                            "at limit" where the median is below 1.00 but its spread reaches it (read 1.00)
    speedup_vs_full         the full-ZO cell's step over this cell's: where both have in-cell pairs, in their own
                            reference forwards (full's step / 2 fwd over this cell's, a median below 1.00 read
                            as the limit 1.00, none where either timing is a fault), so load that stretched one
                            cell's steps and forwards alike cancels (``speedup_clock`` "reference forwards");
                            else their step medians in seconds ("seconds")

    A cell's references are the ok records sharing its ``reference_key`` (model, dtype, quant, task, batch,
    length, device, seed). Each cell's latest record counts, and where several cells could serve as a
    reference the one with the smallest cell id does: the result depends on the set of records, not on the
    order in which cells ran, finished or were appended.
    """

    peak_mib: float | None = None
    peak_kind: str | None = None
    cell_peak_mib: float | None = None
    cell_peak_phase: str | None = None
    peak_over_inference: float | None = None
    step_over_two_forwards: float | None = None
    step_over_two_forwards_p10: float | None = None
    step_over_two_forwards_p90: float | None = None
    step_timing: str | None = None
    forward_ref: str | None = None
    speedup_vs_full: float | None = None
    speedup_clock: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def is_cuda(rec: CellRecord) -> bool:
    return str(rec.device or rec.config.get("device") or "cpu").startswith("cuda")


PEAK_KEYS = {"device": "device_peak_mib", "allocated": "cuda_max_allocated_mib", "rss": "peak_rss_mib"}


def peak_kind(rec: CellRecord) -> str:
    """What a cell's peak means: what the card holds (device) where the driver was sampled, else what the
    allocator handed out (allocated) on a GPU, else the process's resident memory (rss)."""
    if not is_cuda(rec):
        return "rss"
    device = any(getattr(rec.phases[p], "device_peak_mib", None) is not None for p in TRAIN_PHASES
                 if p in rec.phases)
    return "device" if device else "allocated"


def train_peak_mib(rec: CellRecord) -> float | None:
    """The training peak (``peak_kind``), the larger of warm-up and train."""
    return phase_peak(rec, TRAIN_PHASES)[0]


def phase_peak(rec: CellRecord, phases: Iterable[str] | None = None) -> tuple[float | None, str | None]:
    """The largest peak (``peak_kind``) over ``phases`` (default: every phase the cell measured) and the
    phase it was in: (None, None) where none of them has one."""
    key = PEAK_KEYS[peak_kind(rec)]
    peak, where = None, None
    for p in (rec.phases if phases is None else phases):
        v = getattr(rec.phases.get(p), key, None) if p in rec.phases else None
        if v is not None and (peak is None or v > peak):
            peak, where = v, p
    return peak, where


def latest_by_cell(records: Iterable[CellRecord]) -> list[CellRecord]:
    """The last record of each cell (a resumed or re-run cell supersedes its earlier line)."""
    by: dict[str, CellRecord] = {}
    for r in records:
        by[r.cell_id] = r
    return list(by.values())


def _family(rec: CellRecord) -> str | None:
    return catalog.METHODS.get(rec.method).family if rec.method in catalog.METHODS else None


def _step(rec: CellRecord) -> float | None:
    return rec.metrics.step_s.median if rec.metrics.step_s else None


def derive(records: Iterable[CellRecord]) -> dict[str, Derived]:
    """``{cell_id: Derived}`` for every cell in ``records`` (see ``Derived``)."""
    def key(r: CellRecord) -> tuple:  # learning-rate pilots are compared among themselves only
        return (*reference_key(r.config), key_part(r.labels.get("stage")))

    latest = sorted(latest_by_cell(records), key=lambda r: r.cell_id)
    # One pass: each group's reference and full-ZO cell (the smallest cell id of each), so that deriving
    # is linear in the number of records (100,000 records take seconds, not hours)
    forwards: dict[tuple, CellRecord] = {}
    fulls: dict[tuple, CellRecord] = {}
    keys = {}
    for r in latest:
        keys[r.cell_id] = k = key(r)
        if r.ok and _family(r) == "reference":
            forwards.setdefault(k, r)
        if r.ok and r.method == SPEEDUP_BASELINE:
            fulls.setdefault(k, r)
    return {rec.cell_id: _ratios(rec, forwards.get(keys[rec.cell_id]), fulls.get(keys[rec.cell_id]))
            for rec in latest}


def _ratios(rec: CellRecord, forward: CellRecord | None, full: CellRecord | None) -> Derived:
    d = Derived(peak_mib=train_peak_mib(rec), peak_kind=peak_kind(rec) if rec.phases else None)
    if rec.phases:
        d.cell_peak_mib, d.cell_peak_phase = phase_peak(rec)
    if not rec.ok:
        return d
    step = _step(rec) if _family(rec) != "reference" else None  # the reference is not compared with itself
    in_cell = rec.metrics.forward_ref_s.median if rec.metrics.forward_ref_s else None
    pairs = rec.metrics.step_over_ref
    if step and pairs:
        d.step_over_two_forwards, d.forward_ref = pairs.median, "in-cell pairs"
        d.step_over_two_forwards_p10, d.step_over_two_forwards_p90 = pairs.p10, pairs.p90
        if pairs.median < 1.0:
            d.step_timing = "fault" if pairs.p90 < 1.0 else "at limit"
    elif step and in_cell:
        d.step_over_two_forwards, d.forward_ref = step / (2 * in_cell), "in-cell"
    elif step and forward is not None and _step(forward):
        d.step_over_two_forwards, d.forward_ref = step / (2 * _step(forward)), "forward cell"
    fwd_peak = train_peak_mib(forward) if forward is not None and forward is not rec else None
    if d.peak_mib and fwd_peak and peak_kind(forward) == d.peak_kind:  # never device over allocated
        d.peak_over_inference = d.peak_mib / fwd_peak
    if step and full is not None and _step(full):  # the full cell itself: 1.00, the column's anchor
        theirs = _ratios(full, forward, None) if full is not rec else d
        if d.forward_ref == theirs.forward_ref == "in-cell pairs":
            if "fault" not in (d.step_timing, theirs.step_timing):
                d.speedup_vs_full = max(theirs.step_over_two_forwards, 1.0) / max(d.step_over_two_forwards, 1.0)
                d.speedup_clock = "reference forwards"
        else:
            d.speedup_vs_full, d.speedup_clock = _step(full) / step, "seconds"
    return d
