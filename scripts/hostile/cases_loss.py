"""Data loss: an output location that zobench replaces (--save, suite save:, influence --out, results,
reports) pointed at something it did not write. The refusal must come before any training (exit 2, one
line naming the path) and leave the target byte for byte as it was."""

from __future__ import annotations

import json
import os

from hostile.common import before_training, cell_ids, run_suite_args, train_saving, write_suite
from hostile.fixtures import TRAIN, suite_text
from hostile.harness import Case

CLS = "loss"


def _docs(ctx, rel="in/mydocs"):
    ctx.write(f"{rel}/report.docx", "quarterly numbers\n")
    ctx.write(f"{rel}/photos/cat.jpg", b"\xff\xd8" + b"\x00" * 500)
    return ctx.p(rel)


def _link(target_rel: str, link_rel: str):
    def setup(ctx):
        link = ctx.p(link_rel)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(ctx.p(target_rel), link)
    return setup


def _save(name, target, needles, note="", setup=None, cwd="a/work", danger=False, extra=(), expect=(2,),
          outputs=("out",), needs=()):
    return Case(CLS, name, train_saving(target, extra), expect=expect, needles=needles, setup=setup,
                outputs=outputs, heavy=True, note=note, cwd=cwd, danger=danger, needs=needs, check=before_training)


def _suite_save_victim(ctx):
    text = suite_text(methods=("random",)).replace("defaults:\n", f"defaults:\n  save: {ctx.sb}/other/kept\n")
    suite = write_suite(ctx, "in/s.yaml", text)
    for cid in cell_ids(ctx, suite):
        ctx.write(f"other/kept/{cid}/precious.txt", "not a delta: the user's own folder\n")


def _results_symlink(ctx, target="other/data.csv"):
    write_suite(ctx, "in/s.yaml", suite_text(methods=("forward",)))
    ctx.p("out/r").mkdir(parents=True)
    os.symlink(ctx.p(target), ctx.p("out/r/t.jsonl"))


def _resume_symlink(ctx):
    """The link points at another results file that --resume can read (a record of some other cell)."""
    first = json.loads(ctx.fx.path("results").read_text().splitlines()[0])
    ctx.write("other/old.jsonl", json.dumps(dict(first, cell_id="000000000000")) + "\n")
    _results_symlink(ctx, "other/old.jsonl")


def _plots_symlink(ctx):
    ctx.copy("results", "in/t.jsonl")
    ctx.write("other/plots/dev_accuracy.png", b"\x89PNG my own figure")
    ctx.write("other/plots/dev_vs_time.png", b"\x89PNG another of mine")
    ctx.p("out/rep").mkdir(parents=True)
    os.symlink(ctx.p("other/plots"), ctx.p("out/rep/t_plots"))


def _md_symlink(ctx):
    ctx.copy("results", "in/t.jsonl")
    ctx.p("out/rep").mkdir(parents=True)
    os.symlink(ctx.p("other/data.csv"), ctx.p("out/rep/t.md"))


def _record_symlink(ctx):
    ctx.p("out/run").mkdir(parents=True)
    os.symlink(ctx.p("other/data.csv"), ctx.p("out/run/record.json"))


CASES = [
    _save("save-into-nonempty-folder", "{sb}/in/mydocs", ("{sb}/in/mydocs",), setup=lambda c: _docs(c),
          note="a folder of the user's files is not a delta: refuse, never rmtree it"),
    _save("save-dot", ".", (("--save", "'.'", "{work}"),), danger=True,
          note="cwd = sb/a/work holds notes.txt; `--save .` must be refused outright"),
    _save("save-dotdot", "..", (("--save", "..", "{sb}/a"),), danger=True, note="`--save ..` would take sb/a with it"),
    _save("save-dotdot-dotdot", "../..", (("--save", "../..", "{sb}"),), danger=True,
          note="the whole sandbox is the target"),
    _save("save-home", "{home}", ("{home}",), danger=True, note="HOME is a fake one inside the sandbox"),
    _save("save-home-unnormalised", "{work}/../../home", ("home",), danger=True,
          note="the same folder, spelled with .."),
    _save("save-root", "/", (("--save", "'/'", " / ", "/:"),), danger=True,
          note="the guard stops any rmtree of '/' (exit 97): unclean means it got that far"),
    _save("save-cwd-absolute", "{work}", ("{work}",), danger=True, note="the current directory by its full path"),
    _save("save-over-a-complete-delta", "{sb}/in/kept", ("{sb}/in/kept",),
          setup=lambda c: c.copy("sparse", "in/kept"),
          needs=("sparse",),
          note="replacing an existing delta needs an explicit flag; without it: refuse, keep the old one"),
    _save("save-over-the-delta-it-loads", "{sb}/in/kept", ("{sb}/in/kept",), extra=("--delta", "{sb}/in/kept"),
          setup=lambda c: c.copy("sparse", "in/kept"), needs=("sparse",),
          note="continue training and overwrite the input"),
    _save("save-into-parent-of-input-delta", "{sb}/in", ("{sb}/in",), extra=("--delta", "{sb}/in/kept"),
          setup=lambda c: c.copy("sparse", "in/kept"), needs=("sparse",),
          note="the folder holding the delta being loaded"),
    _save("save-symlink-to-folder", "{sb}/in/link", ("{sb}/in/link",), setup=_link("other", "in/link"),
          note="a symlink to another folder: neither the link nor its target may go"),
    _save("save-onto-a-file", "{sb}/other/data.csv", ("{sb}/other/data.csv",),
          note="an existing file: refused before training (baseline trains, then fails)"),
    Case(CLS, "influence-train-save-nonempty", ["influence", "train", "--model", "random:tiny-llama", "--data",
         "{fx}/data.jsonl", "--method", "lora", "--steps", "1", "--batch-size", "4", "--max-length", "32",
         "--save", "{sb}/in/mydocs"], setup=lambda c: _docs(c), needles=("{sb}/in/mydocs",), heavy=True,
         check=before_training,
         needs=("data.jsonl",), note="influence train keeps its result with the same save()"),
    Case(CLS, "influence-train-save-dot", ["influence", "train", "--model", "random:tiny-llama", "--data",
         "{fx}/data.jsonl", "--method", "lora", "--steps", "1", "--batch-size", "4", "--max-length", "32",
         "--save", "."], needles=(("--save", "'.'", "{work}"),), heavy=True, danger=True, needs=("data.jsonl",),
         check=before_training),
    Case(CLS, "suite-save-key-onto-user-folders", run_suite_args("in/s.yaml"), expect=(0, 2),
         setup=_suite_save_victim, outputs=("out",), heavy=True, bound_s=120,
         note="a suite written by someone else with save: pointing at folders named like its cells; "
              "exit 0 (cell recorded as failed) or 2 are both fine, the folders must survive"),
    Case(CLS, "results-file-symlink-elsewhere", run_suite_args("in/s.yaml"), setup=_results_symlink,
         needles=("{sb}/out/r/t.jsonl",), outputs=("out",), heavy=True, bound_s=120,
         note="results/t.jsonl is a symlink to other/data.csv: must not be appended through"),
    Case(CLS, "resume-results-file-symlink", run_suite_args("in/s.yaml", "--resume"), setup=_resume_symlink,
         needles=("{sb}/out/r/t.jsonl",), outputs=("out",), heavy=True, bound_s=120, needs=("results",),
         note="the link's target is a readable results file: --resume must not append through it either"),
    Case(CLS, "report-plots-folder-symlink", ["report", "{sb}/in/t.jsonl", "--out", "{sb}/out/rep"],
         expect=(0, 2), setup=_plots_symlink, outputs=("out",), needs=("results",), bound_s=90,
         note="report removes 'stale' plots by name: through a symlinked plots folder it removes the user's "
              "files. Unsure: refusing (2) or writing only new files (0) are both accepted"),
    Case(CLS, "influence-cache-out-home", ["influence", "cache", "--model", "random:tiny-llama", "--data",
         "{fx}/data.jsonl", "--scope", "all", "--k", "16", "--max-length", "32", "--out", "{home}"],
         needles=("{home}",), heavy=True, needs=("data.jsonl",), note="a non-empty folder that is no cache"),
    Case(CLS, "influence-cache-out-dot", ["influence", "cache", "--model", "random:tiny-llama", "--data",
         "{fx}/data.jsonl", "--scope", "all", "--k", "16", "--max-length", "32", "--out", "."],
         needles=(("--out", "'.'", "{work}", ": exists"),), heavy=True, needs=("data.jsonl",)),
    Case(CLS, "report-md-symlink-not-written-through", ["report", "{sb}/in/t.jsonl", "--out", "{sb}/out/rep"],
         expect=(0, 2), setup=_md_symlink, outputs=("out",), needs=("results",), bound_s=90,
         note="regression: the report is replaced by rename, so other/data.csv stays"),
    Case(CLS, "train-record-symlink-not-written-through",
         TRAIN + ["--method", "forward", "--out", "{sb}/out/run"], expect=(0, 2), setup=_record_symlink,
         outputs=("out",), heavy=True,
         note="regression: record.json is replaced by rename"),
    _save("save-into-empty-folder-is-fine", "{sb}/in/empty", (), expect=(0,),
          setup=lambda c: c.p("in/empty").mkdir(parents=True), outputs=("out", "in/empty"),
          note="positive control: an empty existing folder may become the delta"),
]
