"""scripts/sync_run.py: a long suite's records, predictions and checkpoints carried between checkouts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sync(src: Path, dst: Path, name: str = "s") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_run.py"), str(src), str(dst), name],
                          capture_output=True, text=True)


def _results(root: Path, lines: list[str], preds: dict, ckpts: dict) -> Path:
    res = root / "results"
    (res / "s.predictions").mkdir(parents=True)
    (res / "s.checkpoints").mkdir()
    (res / "s.jsonl").write_text("".join(line + "\n" for line in lines))
    for n, b in preds.items():
        (res / "s.predictions" / n).write_bytes(b)
    for n, t in ckpts.items():
        (res / "s.checkpoints" / n).write_text(t)
    return res


def test_progress_is_carried_and_finished_checkpoints_go(tmp_path):
    src = _results(tmp_path / "run", ['{"a": 1}', '{"a": 2}', '{"a": 3}'],
                   {"aaaaaa000001.npz": b"one", "aaaaaa000002.npz": b"two-new"},
                   {"aaaaaa000003.json": '{"step": 300}'})
    dst = _results(tmp_path / "main", ['{"a": 1}'], {"aaaaaa000002.npz": b"two-old", "notes.npz": b"x"},
                   {"aaaaaa000001.json": '{"step": 900}', "README.json": "mine"})
    (src / "s.jsonl").open("a").write('{"a": 4')  # a record half-appended: not copied yet
    done = _sync(tmp_path / "run", tmp_path / "main")
    assert done.returncode == 0, done.stderr
    assert (dst / "s.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n{"a": 3}\n'
    assert (dst / "s.predictions" / "aaaaaa000001.npz").read_bytes() == b"one"
    assert (dst / "s.predictions" / "aaaaaa000002.npz").read_bytes() == b"two-new"
    assert (dst / "s.predictions" / "notes.npz").read_bytes() == b"x"  # never deleted
    assert (dst / "s.checkpoints" / "aaaaaa000003.json").read_text() == '{"step": 300}'
    assert not (dst / "s.checkpoints" / "aaaaaa000001.json").exists()  # its cell finished there
    assert (dst / "s.checkpoints" / "README.json").read_text() == "mine"  # not a checkpoint's name: kept
    again = _sync(tmp_path / "run", tmp_path / "main")
    assert again.returncode == 0 and "nothing to copy" in again.stdout


def test_records_that_differ_are_never_overwritten(tmp_path):
    _results(tmp_path / "run", ['{"a": 1}', '{"a": 2}'], {"aaaaaa000001.npz": b"one"}, {})
    dst = _results(tmp_path / "main", ['{"a": 1}', '{"a": 9}'], {}, {})
    done = _sync(tmp_path / "run", tmp_path / "main")
    assert done.returncode == 2 and "not a prefix" in done.stderr and "Traceback" not in done.stderr
    assert (dst / "s.jsonl").read_text() == '{"a": 1}\n{"a": 9}\n'
    assert not (dst / "s.predictions" / "aaaaaa000001.npz").exists()  # nothing copied at all
    longer = _results(tmp_path / "more", ['{"a": 1}', '{"a": 9}', '{"a": 10}'], {}, {})
    assert _sync(tmp_path / "main", tmp_path / "more").returncode == 2  # a shorter source would drop one
    assert (longer / "s.jsonl").read_text().count("\n") == 3
    assert _sync(tmp_path / "more", tmp_path / "main", "../x").returncode == 2


def test_links_a_running_writer_and_bytes_no_record_names_are_refused(tmp_path):
    import hashlib
    import json

    from zobench.outdirs import output_lock

    good, stale = b"the recorded bytes", b"other bytes"
    record = json.dumps({"cell_id": "aaaaaa000001", "predictions": {"sha256": hashlib.sha256(good).hexdigest()}})
    _results(tmp_path / "run", [record], {"aaaaaa000001.npz": stale}, {"aaaaaa000002.json": "{}"})
    dst = _results(tmp_path / "main", [], {"aaaaaa000001.npz": good}, {})
    done = _sync(tmp_path / "run", tmp_path / "main")
    assert done.returncode == 0 and "not the bytes its record names" in done.stdout
    assert (dst / "s.predictions" / "aaaaaa000001.npz").read_bytes() == good  # a finished cell's file kept

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "bbbbbb000001.json").write_text("theirs")
    (dst / "s.checkpoints").rename(tmp_path / "old")
    (dst / "s.checkpoints").symlink_to(victim)
    refused = _sync(tmp_path / "run", tmp_path / "main")
    assert refused.returncode == 2 and "symbolic link" in refused.stderr
    assert (victim / "bbbbbb000001.json").read_text() == "theirs" and len(list(victim.iterdir())) == 1

    (dst / "s.checkpoints").unlink()
    with output_lock(dst / "s.jsonl"):  # a zobench run writing the destination
        busy = _sync(tmp_path / "run", tmp_path / "main")
    assert busy.returncode == 2 and "another zobench run" in busy.stderr
