"""Records: schema, atomic JSONL append, reading, and a pandas view.

One JSON line per cell in ``results/<suite>.jsonl``. A record is readable without the code that wrote it:

    schema          int, SCHEMA_VERSION
    suite           suite name
    cell_id         stable hash of the resolved cell config (resume key)
    labels          {axis: value} the matrix coordinates of this cell (method, quant, density, ...)
    config          the resolved CellConfig as a dict
    status          "ok" | "failed" | "timeout" | "unsupported"
    reason          one line, for anything but ok
    traceback_tail  last lines of the traceback of a failed cell
    device          "cpu" | "cuda"
    model_source    "builtin" | "gguf" | "pretrained" | "random"
    accuracy_meaningful  false for random-weight models (memory/latency only)
    phases          {load|eval_before|mask|warmup|train|eval_after: {seconds, peak_rss_mib, start_rss_mib,
                     end_rss_mib, [cuda_max_allocated_mib, cuda_max_reserved_mib]}}
    metrics         test_before/test_after {accuracy} or {em, f1}; final_loss; loss_curve [..];
                    dev_curve [{step, accuracy|em,f1}]; steps_done; step_s {median,p10,p90,n};
                    step_parts_s {perturb|forward_plus|forward_minus|update|forward|backward: {median,...}};
                    tokens_per_s; density_obtained; mask_nnz; trainable_numel; sqgrad_mass_frac;
                    restore_drift_frac_changed; restore_drift_max_abs; mask_build_s; mask_cache_hit
    derived         peak_mib (the training peak: CUDA max allocated, else train-phase peak RSS);
                    step_over_two_forwards; peak_over_inference; speedup_vs_full (vs the full-ZO cell
                    with the same model/dtype/quant/task)
    estimate        predicted peak memory (``zobench estimate``), when known
    env             versions, CPU/GPU, threads, malloc settings
    git             {commit, dirty}
    started_at, finished_at (ISO 8601 UTC), wall_s

Appends write the whole line or nothing (``zobench.files.append_line``: short writes are completed, a
failed write is rolled back), so a killed run or a full disk leaves either the full line or none;
``read_records`` skips (and reports) a torn last line and refuses a file with a bad line anywhere else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

from zobench.errors import UserError

SCHEMA_VERSION = 1


STATUSES = ("ok", "failed", "timeout", "unsupported")
# Fields that, when present, must be JSON objects: reports and checks read into them by key.
MAPPINGS = ("labels", "config", "metrics", "phases", "derived", "estimate", "env", "git")


def append_record(path: str | Path, record: dict) -> None:
    """Append one record as one JSON line: the whole line or nothing (see ``zobench.files.append_line``)."""
    from zobench.files import append_line

    line = (json.dumps(record, default=str, allow_nan=False) + "\n").encode()
    append_line(path, line)


def check_record(rec, where: str) -> dict:
    """``rec`` as read from a results file, or a one-line ``UserError`` naming the line and the field."""
    if not isinstance(rec, dict) or "cell_id" not in rec:
        raise UserError(f"{where}: not a zobench record (no 'cell_id')")
    if not isinstance(rec["cell_id"], str):
        raise UserError(f"{where}: field 'cell_id' = {rec['cell_id']!r}: expected a string")
    schema = rec.get("schema", 0)
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise UserError(f"{where}: field 'schema' = {schema!r}: expected an integer schema version")
    if schema > SCHEMA_VERSION:
        raise UserError(f"{where}: schema {schema} is newer than this zobench ({SCHEMA_VERSION})")
    for key in MAPPINGS:
        if rec.get(key) is not None and not isinstance(rec[key], dict):
            raise UserError(f"{where}: field '{key}' = {_short(rec[key])}: expected a JSON object")
    if "status" in rec and rec["status"] not in STATUSES:
        raise UserError(f"{where}: field 'status' = {_short(rec['status'])}: expected one of "
                        f"{', '.join(STATUSES)}")
    return rec


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def read_records(path: str | Path) -> list[dict]:
    """Every record of a results file, in file order.

    Only the last line may be torn (an interrupted append: skipped with a warning); an unreadable line
    anywhere else means the file is corrupt, and that is an error naming the line.
    """
    from zobench.files import read_text

    path = Path(path)
    text = read_text(path, "results file")
    lines = text.split("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # no newline after it: an append that was cut short
                print(f"zobench: warning: {path}:{n}: skipped a torn last line (an interrupted append)",
                      file=sys.stderr)
                continue
            raise UserError(f"{path}:{n}: not a JSON record ({e.msg} at column {e.colno}); the results "
                            f"file is corrupt") from None
        out.append(check_record(rec, f"{path}:{n}"))
    return out


def latest_by_cell(records: Iterable[dict]) -> list[dict]:
    """The last record of each cell (a resumed or re-run cell supersedes the earlier line)."""
    by: dict[str, dict] = {}
    for r in records:
        by[r["cell_id"]] = r
    return list(by.values())


def flatten(record: dict) -> dict:
    """One flat row per record: labels, status, key metrics, phase peaks and derived ratios."""
    m, d = record.get("metrics", {}), record.get("derived", {})
    row = {"suite": record.get("suite"), "cell_id": record.get("cell_id"), "status": record.get("status"),
           "reason": record.get("reason")}
    row.update(record.get("labels", {}))
    for key in ("final_loss", "tokens_per_s", "density_obtained", "mask_nnz", "sqgrad_mass_frac",
                "restore_drift_frac_changed", "restore_drift_max_abs"):
        row[key] = m.get(key)
    for when in ("test_before", "test_after"):
        for k, v in (m.get(when) or {}).items():
            row[f"{when}_{k}"] = v
    for k, v in (m.get("step_s") or {}).items():
        row[f"step_{k}_s"] = v
    for part, stats in (m.get("step_parts_s") or {}).items():
        row[f"{part}_median_s"] = stats.get("median")
    for phase, vals in (record.get("phases") or {}).items():
        for k, v in vals.items():
            if k.endswith("_mib") or k == "seconds":
                row[f"{phase}_{k}"] = v
    row.update({k: v for k, v in d.items()})
    if record.get("estimate"):
        row["estimated_peak_mib"] = record["estimate"].get("peak_mib")
    return row


def to_pandas(path_or_records):
    """Records as a DataFrame, one row per cell (latest record wins): ``zobench.results.to_pandas(path)``."""
    import pandas as pd

    recs = read_records(path_or_records) if isinstance(path_or_records, (str, Path)) else list(path_or_records)
    return pd.DataFrame([flatten(r) for r in latest_by_cell(recs)])
