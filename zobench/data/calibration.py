"""The calibration corpus: pre-training-like text for the sensitive mask's squared gradients and for GPTQ.

Which file is used, in order: ``calib_path`` when given; else ``<data_dir>/c4/c4_validation_2k.jsonl``
(``data_dir`` from the run's settings, then ``$ZOBENCH_DATA``); else the C4 sample packaged with zobench
(``zobench/data/c4``: the first 150 documents of that file, about 80k SmolLM2 tokens), so the sensitive
method and GPTQ work on any machine, with no data folder. Sequences are cut from the start of the
concatenated corpus, so any run that needs fewer tokens than the sample holds (the default 16 x 256 does)
gets exactly the batches the full file would give.

Every mask and GPTQ cache entry records which corpus it came from (``Corpus.describe``): its source, file
name and a hash of its contents.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from zobench.errors import UserError
from zobench.files import parse_json, text_lines

DEFAULT_CORPUS = "c4/c4_validation_2k.jsonl"     # inside a data directory (../shared/data layout)
PACKAGED_DIR = Path(__file__).with_name("c4")
PACKAGED_CORPUS = PACKAGED_DIR / "c4_validation_sample.jsonl"
PACKAGED_DOCUMENTS = 150


@dataclass(frozen=True)
class Corpus:
    path: Path
    source: str     # "calib_path", "data_dir" or "packaged"

    @property
    def sha256(self) -> str:
        return _sha256(self.path)

    @property
    def key(self) -> str:
        """What cache keys use: the contents, not the path (a copy elsewhere is the same corpus)."""
        return f"{self.path.name}:{self.sha256[:16]}"

    def describe(self) -> dict:
        return {"source": self.source, "file": self.path.name, "sha256": self.sha256[:16]}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_corpus(calib_path: str | None = None, data_dir: str | None = None) -> Corpus:
    """The calibration corpus a run uses (see the module docstring)."""
    if calib_path:
        path = Path(calib_path)
        if not path.is_file():
            raise UserError(f"calib_path '{calib_path}': calibration corpus not found")
        return Corpus(path, "calib_path")
    for root in (data_dir, os.environ.get("ZOBENCH_DATA")):
        if root and (Path(root) / DEFAULT_CORPUS).is_file():
            return Corpus(Path(root) / DEFAULT_CORPUS, "data_dir")
    if not PACKAGED_CORPUS.is_file():  # an install that dropped package data
        raise UserError(f"the calibration corpus is missing from this install ({PACKAGED_CORPUS}); "
                        f"set calib_path, or data_dir to a folder with {DEFAULT_CORPUS}")
    return Corpus(PACKAGED_CORPUS, "packaged")


def corpus_batches(corpus: Corpus | Path, tokenizer, n_seq: int, seq_len: int, vocab_size: int | None = None):
    """``n_seq`` sequences of ``seq_len`` tokens cut from the concatenated corpus (jsonl 'text' or raw text),
    as a list of ``[1, seq_len]`` tensors."""
    path = corpus.path if isinstance(corpus, Corpus) else Path(corpus)
    ids: list[int] = []
    need = n_seq * seq_len
    for lineno, line in text_lines(path, "calibration corpus"):  # over-long lines refused, never tokenized
        if path.suffix == ".jsonl":
            try:
                text = parse_json(line, f"{path}:{lineno}")["text"]
            except (UserError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a 'text' field")
        else:
            text = line
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise UserError(f"{path}: corpus has {len(ids)} tokens, {need} needed ({n_seq} sequences x {seq_len}); "
                        f"lower calib_sequences or calib_length, or give a larger calib_path")
    t = torch.tensor(ids[:need]).view(n_seq, seq_len)
    if vocab_size:
        t = t % vocab_size
    return [t[i:i + 1] for i in range(n_seq)]


def build_c4_sample(source: str | Path, out: str | Path = PACKAGED_CORPUS, n: int = PACKAGED_DOCUMENTS) -> None:
    """Write the packaged sample: the first ``n`` lines of a C4 validation jsonl, byte for byte."""
    lines = []
    with open(source, "rb") as f:
        for line in f:
            lines.append(line)
            if len(lines) == n:
                break
    Path(out).write_bytes(b"".join(lines))
