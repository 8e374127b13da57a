"""The calibration corpus: packaged with zobench, used when none is named, recorded in every mask."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from zobench.data.calibration import PACKAGED_CORPUS, PACKAGED_DOCUMENTS, corpus_batches, find_corpus
from zobench.errors import UserError


def test_packaged_corpus_is_the_first_documents_of_the_c4_sample(data_dir):
    full = (data_dir / "c4" / "c4_validation_2k.jsonl").read_bytes().splitlines(keepends=True)
    assert PACKAGED_CORPUS.read_bytes() == b"".join(full[:PACKAGED_DOCUMENTS])


def test_without_a_data_dir_the_packaged_corpus_is_used(monkeypatch, tmp_path, data_dir):
    monkeypatch.delenv("ZOBENCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here: nothing may depend on the working directory
    assert find_corpus().source == "packaged"
    assert find_corpus(data_dir=str(data_dir)).source == "data_dir"
    monkeypatch.setenv("ZOBENCH_DATA", str(data_dir))
    assert find_corpus().source == "data_dir"
    with pytest.raises(UserError, match="calibration corpus not found"):
        find_corpus(calib_path=str(tmp_path / "nope.jsonl"))


def test_the_packaged_sample_gives_the_full_files_batches(tokenizer, data_dir):
    """The default 16 x 256 tokens (and far more) come from the start of the corpus: the same tokens."""
    import torch

    small = corpus_batches(find_corpus(), tokenizer, 64, 1024)
    full = corpus_batches(data_dir / "c4" / "c4_validation_2k.jsonl", tokenizer, 64, 1024)
    assert all(torch.equal(a, b) for a, b in zip(small, full))
    with pytest.raises(UserError, match="tokens, .* needed"):
        corpus_batches(find_corpus(), tokenizer, 1000, 1024)


def test_sensitive_training_in_a_clone_without_shared_data(tmp_path):
    """`zobench train --method sensitive` from a directory with no data beside it: the packaged corpus,
    and the record says so."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "ZOBENCH_DATA"}
    r = subprocess.run([sys.executable, "-m", "zobench.cli", "train", "--model", "random:tiny-llama",
                        "--method", "sensitive", "--density", "0.01", "--steps", "2", "--out", str(out),
                        "--set", "calib_sequences=2", "--set", "calib_length=64", "--set", "n_test=0",
                        "--set", "n_dev=0", "--set", "n_train=8", "--set", "batch_size=4"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    corpus = json.loads((out / "record.json").read_text())["metrics"]["calib_corpus"]
    assert corpus["source"] == "packaged" and corpus["file"] == PACKAGED_CORPUS.name
