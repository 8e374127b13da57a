"""SQuAD v1.1 and DROP: generation tasks with MeZO's templates, and SQuAD-style EM / F1.

Rows are flattened to the Hugging Face layout MeZO read (one row per question), from the official
release files, so the same rows come out in the same order.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path
from typing import Iterator

from zobench.errors import UserError
from zobench.tasks.base import Task, describe, load_json


class SQuAD(Task):
    name = "squad"
    kind = "generation"
    dirs = ("squad", "SQuAD")
    files = {"train": "train-v1.1*.json", "validation": "dev-v1.1*.json"}
    layout = "official SQuAD v1.1 JSON: data [{title, paragraphs [{context, qas [{question, answers [{text}]}]}]}]"
    hf = ("rajpurkar/squad", None)

    def prompt(self, row):
        return f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question'].strip()}\nAnswer:"

    def answers(self, row):
        return row["answers"]

    def parse(self, path: Path) -> Iterator[tuple[str, dict]]:
        doc = load_json(path, self.layout)
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise UserError(f"{path}: no top-level 'data' list (expected {self.layout})")
        for i, article in enumerate(doc["data"]):
            where = f"{path}: data[{i}]"
            try:
                # title.strip() and every answer kept (duplicates too), as the Hugging Face squad loader does
                title = article.get("title", "").strip()
                for j, para in enumerate(article["paragraphs"]):
                    for k, qa in enumerate(para["qas"]):
                        yield f"{where}.paragraphs[{j}].qas[{k}]", {
                            "id": qa.get("id"), "title": title, "context": para["context"],
                            "question": qa["question"], "answers": [a["text"] for a in qa["answers"]]}
            except (KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{where}: {describe(e)} (expected {self.layout})") from None

    def from_hub(self, row):
        return {"id": row.get("id"), "title": row["title"], "context": row["context"], "question": row["question"],
                "answers": list(row["answers"]["text"])}


class DROP(Task):
    name = "drop"
    kind = "generation"
    dirs = ("drop", "DROP")
    files = {"train": "drop_dataset_train*.json", "validation": "validation*.json|drop_dataset_dev*.json"}
    layout = ("DROP JSON: the official layout {section_id: {passage, qa_pairs [{question, query_id, answer "
              "{number, date, spans}}]}} or the Hugging Face layout [{passage, question, answers_spans {spans}}]")
    hf = ("ucinlp/drop", None)

    def prompt(self, row):
        return f"Passage: {row['passage']}\nQuestion: {row['question'].strip()}\nAnswer:"

    def answers(self, row):
        return row["answers_spans"]["spans"]

    def parse(self, path: Path) -> Iterator[tuple[str, dict]]:
        doc = load_json(path, self.layout)
        if isinstance(doc, list):   # already the Hugging Face layout
            for i, row in enumerate(doc):
                yield f"{path}: [{i}]", row
            return
        if not isinstance(doc, dict):
            raise UserError(f"{path}: neither a list nor an object of sections (expected {self.layout})")
        train = "train" in path.name
        for section_id, section in doc.items():
            where = f"{path}: {section_id}"
            try:
                for j, qa in enumerate(section["qa_pairs"]):
                    # The Hugging Face loader, which MeZO used: train keeps "answer", dev "validated_answers".
                    spans = drop_spans([qa["answer"]] if train else qa["validated_answers"])
                    if spans is None:
                        continue   # an empty or self-contradicting answer: dropped there too (9 in train)
                    yield f"{where}.qa_pairs[{j}]", {
                        "section_id": section_id, "query_id": qa.get("query_id"), "passage": section["passage"],
                        "question": qa["question"], "answers_spans": spans}
            except (KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{where}: {describe(e)} (expected {self.layout})") from None


def drop_spans(answers: list[dict]) -> dict | None:
    """DROP answer dicts -> {"spans", "types"} as the Hugging Face `drop` loader builds them, or None
    for an answer it skips. A date becomes "day month year" without its blank parts."""
    spans, types = [], []
    for answer in answers:
        date = answer["date"]
        date_text = " ".join([date.get("day", ""), date.get("month", ""), date.get("year", "")]).strip()
        if answer["number"] != "":
            if date_text or answer["spans"]:
                return None
            spans.append(answer["number"])
            types.append("number")
        elif date_text:
            if answer["spans"]:
                return None
            spans.append(date_text)
            types.append("date")
        for span in answer["spans"]:
            spans.append(span)
            types.append("span")
    return {"spans": spans, "types": types} if spans else None


# -- metrics (MeZO's large_models/metrics.py, i.e. the SQuAD v1.1 evaluation script) ------------------
def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(g) == pred for g in golds))


def f1_score(prediction: str, golds: list[str]) -> float:
    """Token F1 against the best gold answer; 0 when nothing overlaps (also for an empty prediction)."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        same = sum((Counter(pred) & Counter(ref)).values())
        if same:
            p, r = same / len(pred), same / len(ref)
            best = max(best, 2 * p * r / (p + r))
    return best
