"""JSONL records: appends survive a torn line, bad files give one clear error."""

from __future__ import annotations

import json

import pytest

from zobench.errors import UserError
from zobench.results import append_record, read_records, to_pandas


def test_a_torn_last_line_is_skipped_on_read_and_cut_on_the_next_append(tmp_path, capsys):
    p = tmp_path / "r.jsonl"
    append_record(p, {"cell_id": "a", "status": "ok", "labels": {"method": "full"}})
    with open(p, "a") as f:
        f.write('{"cell_id": "b", "sta')  # a writer killed mid-line
    assert [r["cell_id"] for r in read_records(p)] == ["a"]
    assert "torn last line" in capsys.readouterr().err
    append_record(p, {"cell_id": "c", "status": "ok", "labels": {"method": "random"}})
    # the fragment never ends up between two whole records, where it would make the file corrupt
    assert [r["cell_id"] for r in read_records(p)] == ["a", "c"]
    assert len(p.read_text().splitlines()) == 2


def test_a_bad_line_before_the_last_is_corruption(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"cell_id": "a"}\n{"cell_id": "b", "sta\n{"cell_id": "c"}\n')
    with pytest.raises(UserError, match=r"r.jsonl:2: not a JSON record .* corrupt"):
        read_records(p)

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
