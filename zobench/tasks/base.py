"""Tasks as in MeZO (arXiv 2305.17333, princeton-nlp/MeZO large_models/): rows -> examples -> splits.

A task reads the official file layout of its dataset into plain rows, renders a row with MeZO's template
into an `Example`, and samples train/dev/test the way MeZO's `run.py` does, so that the same rows in the
same order with the same seed give the same examples as MeZO.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from zobench.errors import UserError
from zobench.files import MAX_DATA_BYTES, MAX_TEXT_CHARS, parse_json, read_text, text_lines
from zobench.gates import datasets as hub

ROW = "_row"  # the key under which a raw row keeps its position in its split's file (``Example.id``)
DEV_SEED = 1234  # which validation rows are dev with dev_from: validation (the same for every cell seed)


@dataclass
class Example:
    prompt: str
    candidates: list[str] = field(default_factory=list)  # continuations appended to the prompt
    label: int = -1                                       # index into candidates (classification)
    answers: list[str] = field(default_factory=list)      # gold answers (generation)
    target: str = ""                                      # training continuation (generation)
    raw: dict = field(default_factory=dict)
    # MeZO trains COPA (like SQuAD/DROP) as an LM on the correct option, not as classification.
    train_as_classification: bool = True

    @property
    def id(self) -> int | None:
        """The example's row in its split's file (0-based, data rows only): the same whatever the seed or
        the sample, so predictions of different runs pair by it."""
        return self.raw.get(ROW)


@dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    note: str | None = None   # anything a reader of the results must know about how the data was drawn


def final_text(text: str) -> str:
    """MeZO strips spaces off every rendered prompt and leading whitespace off the sequence it scores."""
    return text.strip(" ").lstrip()


def permutation(n: int, seed: int) -> list[int]:
    # np.random.seed(seed); np.random.permutation(n) in MeZO's sample_subset; RandomState draws the same.
    return np.random.RandomState(seed).permutation(n).tolist()


def as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "0", "1"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"label {value!r} is not a boolean")


def label_index(value, names: tuple[str, ...]) -> int:
    """A label given as its name (SuperGLUE jsonl) or its index (Hugging Face datasets) -> index."""
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip().isdigit():
        if int(value) < len(names):
            return int(value)
    raise ValueError(f"label {value!r} is not one of {', '.join(names)} (or 0..{len(names) - 1})")


def describe(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"missing key {e.args[0]!r}"
    if isinstance(e, (TypeError, AttributeError)):
        return "not nested as expected"
    return str(e)


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for n, line in text_lines(path):  # a line longer than zobench reads is refused, never tokenized
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"{path}:{n}")
        except UserError as e:
            why = str(e).removeprefix(f"{path}:{n}: ")
            raise UserError(f"{path}:{n}: not a JSON object: {why} (expected one JSON object per line)") from None
        yield f"{path}:{n}", row


def load_json(path: Path, layout: str):
    try:
        return parse_json(read_text(path, "data file", MAX_DATA_BYTES), str(path))
    except UserError as e:
        raise UserError(f"{e} (expected {layout})") from None


class Task:
    """One task: where its files are, how a row renders (MeZO's template), how it is sampled."""

    name = ""
    kind = "classification"                 # or "generation", "instruction" (tasks.instruction)
    dirs: tuple[str, ...] = ()              # folder names tried under data_dir (then data_dir itself)
    files: dict[str, str] = {}              # split ("train" / "validation") -> file name or glob
    layout = ""                             # the expected row, for error messages
    hf: tuple[str, str | None] | None = None  # Hugging Face dataset (path, config) used without data_dir
    train_as_classification = True
    train_optional = False                  # local data may lack a train split (carve it from validation)
    # A task's default max_length is declared with its name (``spec.catalog.TASK_INFO``).

    # -- MeZO's template: prompt (Template.encode) and what verbalize appends to it -----------------
    def prompt(self, row: dict) -> str:
        raise NotImplementedError

    def options(self, row: dict) -> list[str]:
        """Raw texts appended to prompt(row) by MeZO's verbalize, one per candidate (classification)."""
        raise NotImplementedError

    def label(self, row: dict) -> int:
        raise NotImplementedError

    def answers(self, row: dict) -> list[str]:
        raise NotImplementedError

    def example(self, row: dict) -> Example:
        raw_prompt = self.prompt(row)
        if len(raw_prompt) > MAX_TEXT_CHARS:  # a tokenizer given tens of MB aborts the whole process
            raise ValueError(f"a text of {len(raw_prompt):,} characters, longer than zobench reads "
                             f"({MAX_TEXT_CHARS:,}); remove or shorten it")
        prompt = final_text(raw_prompt)
        if self.kind == "generation":
            answers = [str(a) for a in self.answers(row)]
            if not answers:
                raise ValueError("no gold answers")
            # MeZO's verbalize for SQuAD/DROP: prompt + " {answers[0]}\n" (the newline teaches it to stop).
            target = final_text(raw_prompt + f" {answers[0]}\n")[len(prompt):]
            return Example(prompt, answers=answers, target=target, raw=row, train_as_classification=False)
        candidates = []
        for option in self.options(row):
            full = final_text(raw_prompt + option)
            if not full.startswith(prompt):
                raise ValueError(f"option {option!r} does not extend the prompt")
            candidates.append(full[len(prompt):])
        label = self.label(row)
        if not 0 <= label < len(candidates):
            raise ValueError(f"label {label} out of range for {len(candidates)} candidates")
        return Example(prompt, candidates, label, raw=row, train_as_classification=self.train_as_classification)

    # -- files --------------------------------------------------------------------------------------
    def parse(self, path: Path) -> Iterator[tuple[str, dict]]:
        """(where, row) pairs; where names the file and line (or element) for error messages."""
        return iter_jsonl(path)

    def local_dirs(self, data_dir) -> list[Path]:
        root = Path(data_dir)
        return [root / d for d in self.dirs] + [root]

    def locate(self, split: str, data_dir) -> Path | None:
        for pattern in self.files[split].split("|"):
            for d in self.local_dirs(data_dir):
                hits = [p for p in d.glob(pattern) if p.is_file()]
                if hits:
                    # prefer the shortest name: the full release over a sample beside it
                    return min(hits, key=lambda p: (len(p.name), p.name))
        return None

    def missing(self, split: str, data_dir) -> UserError:
        where = Path(data_dir) / (self.dirs[0] if self.dirs else "") / self.files[split].split("|")[0]
        return UserError(f"{where}: no such file (task '{self.name}' reads its {split} split from there; "
                         f"expected {self.layout})")

    def read(self, split: str, data_dir=None) -> list[dict]:
        """The raw rows of `split` ("train" or "validation"), each checked to render into an example."""
        if data_dir is None:
            pairs = self.read_hub(split)
        else:
            path = self.locate(split, data_dir)
            if path is None:
                raise self.missing(split, data_dir)
            pairs = self.parse(path)
        rows = []
        for where, row in pairs:
            try:
                self.example(row)
            except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
                raise UserError(f"{where}: {describe(e)} (expected {self.layout})") from None
            rows.append({**row, ROW: len(rows)} if isinstance(row, dict) else row)
        return rows

    def has_local(self, split: str, data_dir) -> bool:
        return data_dir is not None and self.locate(split, data_dir) is not None

    def read_hub(self, split: str) -> list[tuple[str, dict]]:
        if self.hf is None:
            raise UserError(f"task '{self.name}' has no downloadable source: pass --data-dir")
        if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
            raise UserError(f"task '{self.name}' needs its data: pass --data-dir (a folder with "
                            f"{self.dirs[0]}/{self.files['train']}); HF_HUB_OFFLINE is set, so nothing is downloaded")
        datasets = hub.load()
        if datasets is None:
            raise UserError(f"task '{self.name}' needs its data: pass --data-dir (a folder with "
                            f"{self.dirs[0]}/...) or pip install datasets to download it")
        path, config = self.hf
        try:
            ds = datasets.load_dataset(path, config, split=split)
        except Exception as e:  # network, missing config: all the user can fix is the source
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"task '{self.name}': cannot load {path} ({config}) split {split}: {first}") from None
        return [(f"{path} ({config}) {split} row {i}", self.from_hub(dict(r))) for i, r in enumerate(ds)]

    def from_hub(self, row: dict) -> dict:
        """A Hugging Face row in the layout `example` reads (most already are)."""
        return row

    # -- sampling -----------------------------------------------------------------------------------
    def sample(self, data_dir=None, n_train: int = 1000, n_dev: int = 500, n_test: int = 1000,
               seed: int = 0, dev_from: str = "train") -> Splits:
        """MeZO's sampling: train and dev from one seeded permutation of the train split (dev at its end),
        test a seeded sample of the validation split (GLUE/SuperGLUE test labels are hidden).

        ``dev_from="validation"``: dev is drawn like test, from the validation split: a fixed ``n_dev`` of
        its rows (seed ``DEV_SEED``, whatever the cell's seed), and test is the rest (at most ``n_test``, in
        file order). Dev then measures what test measures (SST-2's train split is phrases, 8.6 words on
        average, its validation split whole sentences, 19.5), dev and test are disjoint and the same for
        every seed, so runs pair example by example; train still comes from the train split per seed."""
        if dev_from == "validation":
            return self._dev_from_validation(data_dir, n_train, n_dev, n_test, seed)
        notes = []
        if self.train_optional and data_dir is not None and not self.has_local("train", data_dir):
            valid = self.read("validation", data_dir)
            order = permutation(len(valid), seed)
            train_rows, dev_rows, test_rows, note = _carve(valid, order, n_train, n_dev, n_test)
            notes.append(f"{self.name}: no train split in the data: train and dev carved from the validation "
                         f"split with seed {seed}, test is the disjoint remainder{note}")
        else:
            train, valid = self.read("train", data_dir), self.read("validation", data_dir)
            order = permutation(len(train), seed)[:n_train + n_dev]
            n_d = min(n_dev, len(order) - (1 if n_train and order else 0))
            train_rows = [train[i] for i in order[:len(order) - n_d]]
            dev_rows = [train[i] for i in order[len(order) - n_d:]]
            if len(order) < n_train + n_dev:
                notes.append(f"{self.name}: train split has {len(train)} rows, fewer than n_train + n_dev = "
                             f"{n_train + n_dev}: train {len(train_rows)}, dev {len(dev_rows)} (dev keeps its "
                             f"size first, as in MeZO)")
            test_rows = [valid[i] for i in permutation(len(valid), seed)[:n_test]]
            if len(test_rows) < n_test:
                notes.append(f"{self.name}: test is the whole validation split ({len(test_rows)} < {n_test})")
        note = self.data_note(data_dir)
        if note:
            notes.insert(0, note)
        return Splits([self.example(r) for r in train_rows], [self.example(r) for r in dev_rows],
                      [self.example(r) for r in test_rows], "; ".join(notes) or None)

    def _dev_from_validation(self, data_dir, n_train: int, n_dev: int, n_test: int, seed: int) -> Splits:
        train, valid = self.read("train", data_dir), self.read("validation", data_dir)
        held = sorted(permutation(len(valid), DEV_SEED)[:n_dev])
        if len(valid) - len(held) < 1:
            raise UserError(f"task '{self.name}': n_dev {n_dev} leaves no validation row for test "
                            f"({len(valid)} rows)")
        taken = set(held)
        rest = [i for i in range(len(valid)) if i not in taken][:n_test]
        train_rows = [train[i] for i in permutation(len(train), seed)[:n_train]]
        note = (f"{self.name}: dev is {len(held)} rows of the validation split (fixed, seed {DEV_SEED}), test the "
                f"other {len(rest)}; train {len(train_rows)} rows of the train split (seed {seed})")
        extra = self.data_note(data_dir)
        return Splits([self.example(r) for r in train_rows], [self.example(valid[i]) for i in held],
                      [self.example(valid[i]) for i in rest], "; ".join(n for n in (extra, note) if n))

    def data_note(self, data_dir) -> str | None:
        return None


def _carve(rows: list, order: list[int], n_train: int, n_dev: int, n_test: int):
    n = len(order)
    a = min(n_train, n)
    b = min(a + n_dev, n)
    c = min(b + n_test, n)
    short = "" if c == n_train + n_dev + n_test else f" (only {n} rows: train {a}, dev {b - a}, test {c - b})"
    return [rows[i] for i in order[:a]], [rows[i] for i in order[a:b]], [rows[i] for i in order[b:c]], short
