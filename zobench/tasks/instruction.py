"""Instruction tuning on Alpaca-format rows (task ``alpaca``): the data side, without torch.

A row is a dict {instruction, input, output} (and an optional ``id``). It is formatted with the Stanford
Alpaca templates; the model is trained, and influence is measured, on the response only (the model side is
``tasks.responses``). The task reads ``alpaca/alpaca_data*.json`` (a JSON list, or JSON Lines) under
``data_dir``: one seeded shuffle of the file gives train, then dev, then test, disjoint. A caller with rows
of its own (the influence suite's poisoned set) hands them to a cell as ``Alpaca.splits_of(rows)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

from zobench.errors import UserError
from zobench.files import MAX_DATA_BYTES, check_text, parse_json, read_text
from zobench.tasks.base import ROW, Example, Splits, Task

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(example: dict) -> str:
    """The Alpaca prompt; the input block only when the example has a non-blank ``input``."""
    if (example.get("input") or "").strip():
        return PROMPT_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


def _json_lines(path: Path, text: str) -> list:
    data = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                entry = parse_json(line, f"{path}: line {n}")
            except UserError as e:
                why = str(e).split(": ", 2)[-1]
                raise UserError(f"{path}: line {n} is not a JSON object ({why})") from None
            if not isinstance(entry, dict):
                raise UserError(f"{path}: line {n} is not a JSON object")
            data.append(entry)
    if not data:
        raise UserError(f"{path}: no examples (expected JSON Lines of {{instruction, input, output}} objects)")
    return data


def _read_checked(path: Path) -> list:
    """The file's entries: a JSON list of objects, or JSON Lines (one object per line, ``.jsonl``)."""
    text = read_text(path, "instruction data file", MAX_DATA_BYTES)
    if path.suffix == ".jsonl":
        data = _json_lines(path, text)
    else:
        try:
            data = parse_json(text, str(path))
        except UserError as e:
            try:  # JSON Lines under another name
                data = _json_lines(path, text)
            except UserError:
                raise UserError(f"{e}; expected a JSON list or JSON Lines of {{instruction, input, output}} "
                                f"objects") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{instruction, input, output}} objects, "
                        f"got {type(data).__name__}")
    seen: dict = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: entry {i} is not an object")
        for key in ("instruction", "output"):
            if not isinstance(entry.get(key), str):
                raise UserError(f"{path}: entry {i} lacks '{key}' (a string)")
        if not isinstance(entry.get("input", ""), str):
            raise UserError(f"{path}: entry {i}: 'input' is not a string")
        for key in ("instruction", "input", "output"):
            check_text(entry.get(key, ""), f"{path}: entry {i}: '{key}'")
        rid = entry.get("id", i)
        if not isinstance(rid, (int, str)) or isinstance(rid, bool):
            raise UserError(f"{path}: entry {i}: 'id' is not a string or an integer")
        # 7 and "7" print alike and name the same row wherever an id is shown or looked up (a query's
        # table, the poisoned ids of a suite): one file may not use both
        if str(rid) in seen:
            raise UserError(f"{path}: entries {seen[str(rid)]} and {i} share the id {rid!r} (ids name rows "
                            f"everywhere; 7 and \"7\" count as one)")
        seen[str(rid)] = i
    return data


def load_alpaca(path: str | Path, n: int | None = None, seed: int = 0, start: int = 0) -> list[dict]:
    """``n`` examples (all when None) from position ``start`` of the file's entries shuffled with ``seed``.

    The same seed gives the same order, so ``start`` carves disjoint slices of one file: a training set
    at start=0 and held-out queries at start=n_train never share an example. Each example is named by
    its ``id``: the entry's own ``id`` field when it has one, else its position in the file (from 0), so a
    row is called the same whatever order it was sampled or cached in.
    """
    path = Path(path)
    data = _read_checked(path)
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    stop = len(order) if n is None else start + n
    if start < 0 or stop > len(order):
        raise UserError(f"{path}: asked for examples {start}..{stop - 1} but the file has {len(order)} entries")
    return [{"id": data[i].get("id", i), "instruction": data[i]["instruction"], "input": data[i].get("input", ""),
             "output": data[i]["output"]} for i in order[start:stop]]


def epoch_batches(items: list, batch_size: int, shuffled: Callable[[int], list[int]]) -> Iterator[list]:
    """Batches of ``min(batch_size, len(items))`` items taken from the end of one shuffled order after
    another (``shuffled(n)``: a permutation of range(n)); a batch may end one epoch and begin the next, so
    every item is seen equally often."""
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < min(batch_size, len(items)):
            if not order:
                order = shuffled(len(items))
            batch.append(items[order.pop()])
        yield batch


def random_order(seed: int) -> Callable[[int], list[int]]:
    """Permutations from ``random.Random(seed)`` (a list shuffled in place: the ZO fine-tune's order)."""
    rng = random.Random(seed)

    def shuffled(n: int) -> list[int]:
        order = list(range(n))
        rng.shuffle(order)
        return order
    return shuffled


class Alpaca(Task):
    """Instruction tuning on Alpaca rows: prompt = the Alpaca template, target = the row's output; the loss
    is on the response tokens (``tasks.responses``), evaluation is that loss on held-out rows."""

    name = "alpaca"
    kind = "instruction"
    dirs = ("alpaca",)
    files = {"train": "alpaca_data*.json|alpaca*.jsonl"}
    layout = "a JSON list (or JSON Lines) of {instruction, input, output} objects"

    def example(self, row: dict) -> Example:
        raw = {**row, ROW: row["id"]} if isinstance(row.get("id"), int) else dict(row)
        return Example(format_prompt(row), target=row["output"], raw=raw, train_as_classification=False)

    def read(self, split: str, data_dir=None, seed: int = 0) -> list[dict]:
        """Every row of the file, in one order shuffled with ``seed`` (``load_alpaca``)."""
        if data_dir is None:
            raise UserError(f"task '{self.name}' needs its data: pass --data-dir (a folder with "
                            f"{self.dirs[0]}/alpaca_data*.json)")
        path = self.locate("train", data_dir)
        if path is None:
            raise self.missing("train", data_dir)
        return load_alpaca(path, seed=seed)

    def sample(self, data_dir=None, n_train: int = 1000, n_dev: int = 500, n_test: int = 1000,
               seed: int = 0, dev_from: str = "train") -> Splits:
        """One file: its rows shuffled with ``seed`` (``load_alpaca``), train first, then dev, then test."""
        if dev_from != "train":
            raise UserError(f"task '{self.name}' has one file: dev comes from it (dev_from: train)")
        rows = self.read("train", data_dir, seed)
        train, dev = rows[:n_train], rows[n_train:n_train + n_dev]
        test = rows[n_train + n_dev:n_train + n_dev + n_test]
        note = None
        if len(rows) < n_train + n_dev + n_test:
            note = (f"{self.name}: the file has {len(rows)} rows, fewer than n_train + n_dev + n_test: train "
                    f"{len(train)}, dev {len(dev)}, test {len(test)}")
        return Splits([self.example(r) for r in train], [self.example(r) for r in dev],
                      [self.example(r) for r in test], note)

    def splits_of(self, train: list[dict]) -> Splits:
        """A caller's rows (``load_alpaca``'s dicts) as a training split, in their order."""
        return Splits([self.example(r) for r in train], [], [])
