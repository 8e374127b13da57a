"""Sketch cache on disk: meta mismatches are refused, partial runs resume, done flags never lie."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from zobench.errors import UserError
from zobench.influence.store import SketchStore, dataset_hash

META = {"model": "tiny", "dataset": "abc", "sketch": {"dim": 100, "k": 8, "seed": 0}}


def _rows(n, k, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def _fill(path, rows):
    """Worker for the two-process test (spawned, so it must live at module level)."""
    store = SketchStore.open_or_create(path, META, 6, 8)
    store.write(rows, _rows(6, 8)[rows])


def test_mismatched_meta_is_refused_with_one_line_naming_the_key(tmp_path):
    SketchStore.open_or_create(tmp_path / "c", META, 5, 8)
    with pytest.raises(UserError) as e:
        SketchStore.open_or_create(tmp_path / "c", META, 5, 4)
    msg = str(e.value)
    assert "\n" not in msg and "key 'k' is 8 here, this run asks for 4" in msg and "meta.json" in msg
    with pytest.raises(UserError, match="key 'model' is \"tiny\" here, this run asks for \"big\""):
        SketchStore.open_or_create(tmp_path / "c", {**META, "model": "big"}, 5, 8)
    with pytest.raises(UserError, match="key 'extra' is missing here"):
        SketchStore.open_or_create(tmp_path / "c", {**META, "extra": 1}, 5, 8)
    assert SketchStore.open_or_create(tmp_path / "c", META, 5, 8).n == 5
    # A tuple in the meta is read back as a list and must still match.
    SketchStore.open_or_create(tmp_path / "t", {**META, "layers": (1, 2)}, 5, 8)
    assert SketchStore.open_or_create(tmp_path / "t", {**META, "layers": (1, 2)}, 5, 8).meta["layers"] == [1, 2]


def test_broken_or_foreign_directories_are_refused(tmp_path):
    SketchStore.open_or_create(tmp_path / "c", META, 5, 8)
    (tmp_path / "c" / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json: unreadable"):
        SketchStore.open_or_create(tmp_path / "c", META, 5, 8)
    (tmp_path / "c" / "meta.json").unlink()
    with pytest.raises(UserError, match="sketch data but no meta.json"):
        SketchStore.open_or_create(tmp_path / "c", META, 5, 8)
    with pytest.raises(UserError, match="not a sketch cache"):
        SketchStore.open(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="exists and is not a sketch cache"):
        SketchStore.open_or_create(tmp_path / "other", META, 5, 8)
    (tmp_path / "empty").mkdir()  # an empty directory is fine to fill
    assert SketchStore.open_or_create(tmp_path / "empty", META, 5, 8).k == 8


def test_partial_store_resumes_with_exactly_the_missing_rows(tmp_path):
    vals = _rows(5, 8)
    store = SketchStore.open_or_create(tmp_path / "c", META, 5, 8)
    assert store.missing().tolist() == [0, 1, 2, 3, 4] and not store.complete
    import torch  # here, not at the top: the spawned workers import this module and need no torch

    store.write([3, 1], torch.from_numpy(vals[[3, 1]]))  # tensors and arrays both accepted
    del store
    again = SketchStore.open_or_create(tmp_path / "c", META, 5, 8)
    assert again.missing().tolist() == [0, 2, 4]
    assert np.array_equal(again.block(1, 2)[0], vals[1].astype(np.float16))
    assert np.array_equal(again.matrix()[3], vals[3].astype(np.float16))
    assert not again.matrix()[[0, 2, 4]].any()
    again.write(np.array([0, 2, 4]), vals[[0, 2, 4]])
    ro = SketchStore.open(tmp_path / "c")
    assert ro.complete and ro.meta["model"] == "tiny"
    assert np.array_equal(np.asarray(ro.matrix()), vals.astype(np.float16))
    with pytest.raises(ValueError, match="read-only"):
        ro.write([0], vals[:1])


def test_done_flags_are_never_set_before_the_rows_are_flushed(tmp_path):
    store = SketchStore.open_or_create(tmp_path / "c", META, 4, 8)
    store.write([0], _rows(1, 8))

    def killed():
        raise KeyboardInterrupt  # the run dies while the rows are being flushed

    store._sketch.flush = killed
    with pytest.raises(KeyboardInterrupt):
        store.write([1, 2], _rows(2, 8))
    assert SketchStore.open(tmp_path / "c").missing().tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="shape"):
        SketchStore.open_or_create(tmp_path / "c", META, 4, 8).write([3], _rows(2, 8))
    assert SketchStore.open(tmp_path / "c").missing().tolist() == [1, 2, 3]


def test_two_processes_writing_disjoint_rows_match_one_process(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_fill, args=(tmp_path / "two", rows)) for rows in ([0, 2, 4], [1, 3, 5])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    _fill(tmp_path / "one", [0, 1, 2, 3, 4, 5])
    two, one = SketchStore.open(tmp_path / "two"), SketchStore.open(tmp_path / "one")
    assert two.complete and np.array_equal(np.asarray(two.matrix()), np.asarray(one.matrix()))


def test_dataset_hash_is_canonical():
    a = [{"text": "hi", "label": 1}, {"text": "yo", "label": 0}]
    assert dataset_hash(a) == dataset_hash([{"label": 1, "text": "hi"}, {"label": 0, "text": "yo"}])
    assert dataset_hash(a) != dataset_hash(a[::-1]) and len(dataset_hash(a)) == 16


def test_cached_row_norms_are_never_unpickled(tmp_path):
    from zobench.influence.retrieve import row_norms

    store = SketchStore.open_or_create(tmp_path / "c", META, 3, 8)
    values = _rows(3, 8)
    store.write([0, 1, 2], values)
    # A pickled object array where the norms belong: loading it with pickles allowed would run code.
    np.save(tmp_path / "c" / "row_norms.f32.npy", np.array([object()] * 3, dtype=object), allow_pickle=True)
    norms = row_norms(SketchStore.open(tmp_path / "c"))
    np.testing.assert_allclose(norms, np.linalg.norm(values.astype(np.float16).astype(np.float32), axis=1),
                               rtol=1e-3)
    assert np.load(tmp_path / "c" / "row_norms.f32.npy", allow_pickle=False).dtype == np.float32  # replaced
    truth = norms.copy()
    # a header claiming 10**11 values (373 GiB to allocate), a wrong length, negative or NaN norms: each is
    # recomputed, never allocated or trusted
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**11,)})
    for bad in (header.getvalue() + b"\0" * 24, np.full(4, 1.0, np.float32), np.array([-1.0, 2.0, 3.0], np.float32),
                np.array([np.nan, 2.0, 3.0], np.float32)):
        path = tmp_path / "c" / "row_norms.f32.npy"
        if isinstance(bad, bytes):
            path.write_bytes(bad)
        else:
            np.save(path, bad)
        np.testing.assert_array_equal(row_norms(SketchStore.open(tmp_path / "c")), truth)


def test_a_cache_larger_than_the_disk_is_refused_before_any_work(tmp_path):
    import subprocess
    import sys
    import textwrap

    from helpers import limit_file_size

    code = textwrap.dedent(f"""
        from zobench.errors import OutputError
        from zobench.influence.store import SketchStore
        try:
            SketchStore.open_or_create({str(tmp_path / "c")!r}, {META!r}, 1000, 4096)
        except OutputError as e:
            print(e)
            raise SystemExit(2)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=limit_file_size(1 << 20))  # 8 MB of sketches, 1 MB of room
    assert r.returncode == 2, r.stderr
    assert "nothing was created" in r.stdout
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []  # no staging directory left
