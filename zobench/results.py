"""Results files: one JSON line per cell record, appended atomically; loading, and a pandas view.

    results/<suite>.jsonl     one ``CellRecord`` per line (``zobench.cell.record``: the schema)

Appends write the whole line or nothing (``zobench.files.append_line``: short writes are completed, a
failed write is rolled back), so a killed run or a full disk leaves either the full line or none. Reading
skips (and reports) a torn last line and refuses a file with a bad line anywhere else, naming it.

    import zobench.results
    df = zobench.results.to_pandas("results/smollm2.jsonl")   # one row per cell, ratios derived on read
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

from zobench.analysis.derive import derive, latest_by_cell
from zobench.cell.record import CellRecord, SchemaError
from zobench.errors import UserError
from zobench.files import MAX_RECORD_BYTES, append_line, parse_json, text_lines

__all__ = ["append_record", "load_records", "read_json_lines", "latest_by_cell", "to_pandas", "flatten"]


def append_record(path: str | Path, record: CellRecord | dict) -> None:
    """Append one record as one JSON line: the whole line or nothing."""
    data = record.to_json() if isinstance(record, CellRecord) else record
    append_line(path, (json.dumps(data, default=str, allow_nan=False) + "\n").encode())


def read_json_lines(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every line of a results file (see the module docstring)."""
    path = Path(path)
    lines = list(text_lines(path, "results file", MAX_RECORD_BYTES))
    out = []
    for n, line in lines:
        if not line.strip():
            continue
        try:
            obj = parse_json(line, f"{path}:{n}")
        except UserError as e:
            if n == len(lines) and not line.endswith("\n"):  # an append that was cut short
                print(f"zobench: warning: {path}:{n}: skipped a torn last line (an interrupted append)",
                      file=sys.stderr)
                continue
            raise UserError(f"{path}:{n}: not a JSON record ({str(e).split('(', 1)[-1].rstrip(')')}); the results "
                            f"file is corrupt") from None
        if not isinstance(obj, dict) or "cell_id" not in obj:
            raise UserError(f"{path}:{n}: not a zobench record (no 'cell_id')")
        out.append((n, obj))
    return out


def is_influence(obj: dict) -> bool:
    return obj.get("kind") == "influence"


def load_records(path: str | Path) -> list[CellRecord]:
    """The typed records of a suite's results file, in file order."""
    out = []
    for n, obj in read_json_lines(path):
        if is_influence(obj):
            raise UserError(f"{path}:{n}: an influence suite's record; `zobench report {path}` renders it")
        try:
            out.append(CellRecord.from_json(obj))
        except SchemaError as e:
            raise UserError(f"{path}:{n}: {e}") from None
    return out


def flatten(rec: CellRecord, derived: dict) -> dict:
    """One flat row: labels, status, key metrics, phase peaks and times, derived ratios, the estimate."""
    m = rec.metrics
    row = {"suite": rec.suite, "cell_id": rec.cell_id, "status": rec.status, "reason": rec.reason}
    row.update(rec.labels)
    for key in ("final_loss", "tokens_per_s", "density_obtained", "mask_nnz", "sqgrad_mass_frac",
                "restore_drift_frac_changed", "restore_drift_max_abs"):
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
    import pandas as pd

    recs = load_records(path_or_records) if isinstance(path_or_records, (str, Path)) else list(path_or_records)
    derived = derive(recs)
    return pd.DataFrame([flatten(r, derived[r.cell_id].to_dict()) for r in latest_by_cell(recs)])
