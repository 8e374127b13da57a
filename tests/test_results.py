"""JSONL records: appends survive a torn line, bad files give one clear error."""

from __future__ import annotations

import json

import pytest

from zobench.errors import UserError
from zobench.results import append_record, read_records, to_pandas


def test_append_after_a_torn_line_keeps_every_whole_record(tmp_path):
    p = tmp_path / "r.jsonl"
    append_record(p, {"cell_id": "a", "status": "ok", "labels": {"method": "full"}})
    with open(p, "a") as f:
        f.write('{"cell_id": "b", "sta')  # a writer killed mid-line
    assert [r["cell_id"] for r in read_records(p)] == ["a"]
    append_record(p, {"cell_id": "c", "status": "ok", "labels": {"method": "random"}})
    # the torn fragment stays on its own line, never merged with the next record; reading skips it
    assert [r["cell_id"] for r in read_records(p)] == ["a", "c"]
    lines = p.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["cell_id"] == "c"

def test_pandas_view_latest_record_wins(tmp_path):
    p = tmp_path / "r.jsonl"
    append_record(p, {"cell_id": "a", "status": "failed", "reason": "boom", "labels": {"method": "full"}})
    append_record(p, {"cell_id": "a", "status": "ok", "labels": {"method": "full"},
                      "metrics": {"test_after": {"accuracy": 0.5}}, "derived": {"peak_mib": 10.0}})
    df = to_pandas(p)
    assert len(df) == 1 and df.loc[0, "status"] == "ok"
    assert df.loc[0, "test_after_accuracy"] == 0.5 and df.loc[0, "peak_mib"] == 10.0


def test_not_a_results_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n')
    with pytest.raises(UserError, match="not a zobench record"):
        read_records(p)
