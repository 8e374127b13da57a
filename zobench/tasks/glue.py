"""GLUE SST-2 and the SuperGLUE classification tasks, with MeZO's templates (large_models/templates.py).

Each template is copied from MeZO verbatim: `prompt` is its Template.encode and `options` what its
verbalize appends for each candidate. The candidate order is MeZO's (`Sample.candidates`), so a label
index means the same thing here and there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from zobench.errors import UserError
from zobench.files import text_lines
from zobench.tasks import packaged
from zobench.tasks.base import Task, as_bool, describe, iter_jsonl, label_index

SUPERGLUE_FILES = {"train": "train.jsonl", "validation": "val.jsonl"}


def _yes_no(row: dict) -> int:
    return int(as_bool(row["label"]))


class SST2(Task):
    name = "sst2"
    dirs = ("SST-2", "sst2", "SST2")
    files = {"train": "train.tsv", "validation": "dev.tsv"}
    layout = "the GLUE SST-2 TSV: header sentence<TAB>label, label 0 (negative) or 1 (positive)"
    hf = ("nyu-mll/glue", "sst2")
    verbalizer = (" terrible", " great")

    def prompt(self, row):
        return f"{row['sentence'].strip()} It was"

    def options(self, row):
        return list(self.verbalizer)

    def label(self, row):
        return label_index(row["label"], ("negative", "positive"))

    def parse(self, path: Path) -> Iterator[tuple[str, dict]]:
        # Split on tabs by hand: SST-2 sentences hold bare quotes that a csv reader would swallow.
        for n, line in text_lines(path):  # a line longer than zobench reads is refused, never tokenized
            line = line.rstrip("\r\n")
            if n == 1:
                if line.split("\t") != ["sentence", "label"]:
                    raise UserError(f"{path}:1: header {line[:200]!r} (expected {self.layout})")
                continue
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise UserError(f"{path}:{n}: {len(parts)} tab-separated fields (expected {self.layout})")
            yield f"{path}:{n}", {"sentence": parts[0], "label": parts[1]}

    def read(self, split, data_dir=None):
        # Without a data_dir, SST-2 is the small sample packaged with zobench: the default suite runs offline.
        return super().read(split, packaged.SST2_DIR if data_dir is None else data_dir)

    def data_note(self, data_dir):
        return packaged.SST2_NOTE if data_dir is None else None


class RTE(Task):
    name = "rte"
    dirs = ("RTE", "rte")
    files = SUPERGLUE_FILES
    layout = "SuperGLUE RTE jsonl: premise, hypothesis, label (entailment or not_entailment)"
    hf = ("aps/super_glue", "rte")

    def prompt(self, row):
        return f"{row['premise']}\nDoes this mean that \"{row['hypothesis']}\" is true? Yes or No?\n"

    def options(self, row):
        return ["Yes", "No"]

    def label(self, row):
        return label_index(row["label"], ("entailment", "not_entailment"))


class CB(Task):
    name = "cb"
    dirs = ("CB", "cb")
    files = SUPERGLUE_FILES
    layout = "SuperGLUE CB jsonl: premise, hypothesis, label (entailment, contradiction or neutral)"
    hf = ("aps/super_glue", "cb")

    def prompt(self, row):
        return f"Suppose {row['premise']} Can we infer that \"{row['hypothesis']}\"? Yes, No, or Maybe?\n"

    def options(self, row):
        return ["Yes", "No", "Maybe"]

    def label(self, row):
        return label_index(row["label"], ("entailment", "contradiction", "neutral"))


class BoolQ(Task):
    name = "boolq"
    dirs = ("BoolQ", "boolq")
    files = SUPERGLUE_FILES
    layout = "SuperGLUE BoolQ jsonl: question, passage, label (true or false)"
    hf = ("google/boolq", None)    # MeZO's load_dataset("boolq"): it has a train split, label in "answer"
    train_optional = True

    def prompt(self, row):
        # MeZO's BoolQ default is BoolQTemplateV3 (get_template(template_version=2)).
        question = row["question"]
        if not question.endswith("?"):
            question = question + "?"
        question = question[0].upper() + question[1:]
        return f"{row['passage']} {question}\n"

    def options(self, row):
        return ["Yes", "No"]

    def label(self, row):
        return 0 if as_bool(row["label"] if "label" in row else row["answer"]) else 1


class WSC(Task):
    name = "wsc"
    dirs = ("WSC", "wsc")
    files = SUPERGLUE_FILES
    layout = "SuperGLUE WSC jsonl: text, target {span1_text, span2_text, ...}, label (true or false)"
    hf = ("aps/super_glue", "wsc.fixed")

    def prompt(self, row):
        spans = row.get("target", row)   # the jsonl nests the spans; the Hugging Face rows are flat
        return (f"{row['text']}\nIn the previous sentence, does the pronoun \"{spans['span2_text'].lower()}\" "
                f"refer to {spans['span1_text']}? Yes or No?\n")

    def options(self, row):
        return ["No", "Yes"]

    label = staticmethod(_yes_no)


class WiC(Task):
    name = "wic"
    dirs = ("WiC", "wic", "WIC")
    files = SUPERGLUE_FILES
    layout = "SuperGLUE WiC jsonl: word, sentence1, sentence2, label (true or false)"
    hf = ("aps/super_glue", "wic")

    def prompt(self, row):
        return (f"Does the word \"{row['word']}\" have the same meaning in these two sentences? Yes, No?\n"
                f"{row['sentence1']}\n{row['sentence2']}\n")

    def options(self, row):
        return ["No", "Yes"]

    label = staticmethod(_yes_no)


class MultiRC(Task):
    name = "multirc"
    dirs = ("MultiRC", "multirc")
    files = SUPERGLUE_FILES
    layout = ("SuperGLUE MultiRC jsonl: passage {text, questions [{question, answers [{text, label}]}]}, "
              "one example per answer")
    hf = ("aps/super_glue", "multirc")

    def parse(self, path: Path) -> Iterator[tuple[str, dict]]:
        # Flattened the way the Hugging Face loader (MeZO's source) does: one row per candidate answer.
        for where, row in iter_jsonl(path):
            try:
                passage = row["passage"]
                for q in passage["questions"]:
                    for a in q["answers"]:
                        yield where, {"paragraph": passage["text"], "question": q["question"], "answer": a["text"],
                                      "label": a.get("label"), "idx": {"paragraph": row.get("idx"),
                                                                        "question": q.get("idx"),
                                                                        "answer": a.get("idx")}}
            except (KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{where}: {describe(e)} (expected {self.layout})") from None

    def prompt(self, row):
        return (f"{row['paragraph']}\nQuestion: {row['question']}\nI found this answer \"{row['answer']}\". "
                f"Is that correct? Yes or No?\n")

    def options(self, row):
        return ["No", "Yes"]

    label = staticmethod(_yes_no)


class COPA(Task):
    name = "copa"
    dirs = ("COPA", "copa")
    files = SUPERGLUE_FILES
    layout = "SuperGLUE COPA jsonl: premise, choice1, choice2, question (cause or effect), label (0 or 1)"
    hf = ("aps/super_glue", "copa")
    train_as_classification = False    # MeZO's mezo.sh: --train_as_classification False for Copa

    def prompt(self, row):
        # MeZO's CopaTemplate (capitalization "correct").
        premise = row["premise"].rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        conjunction = {"effect": " so ", "cause": " because "}.get(row["question"])
        if conjunction is None:
            raise ValueError(f"question {row['question']!r} is not cause or effect")
        return premise + conjunction

    def options(self, row):
        out = []
        for choice in (row["choice1"], row["choice2"]):
            words = choice.split(" ")
            if words[0] != "I":
                words[0] = words[0].lower()
            out.append(" ".join(words))
        return out

    def label(self, row):
        return label_index(row["label"], ("choice1", "choice2"))
