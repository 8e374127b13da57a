"""Wrong exit codes: input at fault must give exit 2 with one line naming the flag, file or key (not exit 4,
not a silent success); a usage error is one line and a hint, not argparse's usage block; two runs on one
results file record every cell once."""

from __future__ import annotations

from collections import Counter

from hostile.common import results_lines, run_suite_args
from hostile.fixtures import ROWS, TINY_SET, suite_text
from hostile.harness import Case
from hostile.runners import concurrent_runner

CLS = "exit"
DATA = "{fx}/data.jsonl"


def _cache(*extra, data=DATA):
    args = {"--model": "random:tiny-llama", "--data": data, "--scope": "all", "--k": "16", "--max-length": "32",
            "--out": "{sb}/out/c"}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    return ["influence", "cache", *[a for kv in args.items() for a in kv]]


def _query(*extra):
    args = {"--cache": "{sb}/in/cache", "--instruction": "Say the number 3", "--generation": "The number is 3."}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    return ["influence", "query", *[a for kv in args.items() for a in kv]]


def _itrain(*extra):
    args = {"--model": "random:tiny-llama", "--data": DATA, "--method": "lora", "--steps": "1", "--batch-size": "4",
            "--max-length": "32", "--save": "{sb}/out/d"}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    return ["influence", "train", *[a for kv in args.items() for a in kv]]


def num(name, argv, flag, note="", expect=(2,), heavy=True, needs=("data.jsonl",), bound=60, setup=None):
    return Case(CLS, name, argv, expect=expect, needles=(flag,), outputs=("out",), heavy=heavy, needs=needs,
                bound_s=bound, note=note, setup=setup)


def _copy_cache(ctx):
    ctx.copy("cache", "in/cache")


def _ids(rows):
    import json

    return lambda ctx: ctx.write("in/data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def usage(name, argv, needle, note=""):
    return Case(CLS, name, argv, needles=(needle,), max_err_lines=2, bound_s=20,
                note=note or "argparse prints a usage block of several lines; one line plus a hint is asked")


def _once_each(ctx, res):
    recs = results_lines(ctx.p("out/r/t.jsonl"))
    counts = Counter(r.get("cell_id") for r in recs)
    why = [f"cell {cid} recorded {n} times" for cid, n in counts.items() if n != 1]
    if len(counts) != 3:
        why.append(f"{len(counts)} of 3 cells recorded")
    res.notes.append(f"{len(recs)} records for {len(counts)} cells")
    return why[:3]


MIXED_IDS = [dict(ROWS[0], id=7), dict(ROWS[1], id="7"), *(dict(r, id=f"r{i}") for i, r in enumerate(ROWS[2:]))]
THREE = suite_text(methods=("forward", "random", "magnitude"))

CASES = [
    num("cache-k-negative", _cache("--k", "-5"), "k", heavy=False),
    num("cache-k-2pow62", _cache("--k", str(2**62)), "k", expect=(0, 2),
        note="k is capped at the scope's dimension, or refused; never a crash or an allocation of 2**63 bytes"),
    num("cache-n-train-negative", _cache("--n-train", "-1"), "--n-train", note="slices [0:-1] silently today"),
    num("cache-n-train-zero", _cache("--n-train", "0"), "--n-train"),
    num("cache-workers-zero", _cache("--workers", "0"), "--workers"),
    num("cache-workers-negative", _cache("--workers", "-2"), "--workers"),
    num("cache-max-length-zero", _cache("--max-length", "0"), "max-length"),
    num("cache-max-length-negative", _cache("--max-length", "-8"), "max-length"),
    num("query-top-negative", _query("--top", "-3"), "--top", setup=_copy_cache, needs=("cache",)),
    num("query-top-zero", _query("--top", "0"), "--top", setup=_copy_cache, needs=("cache",)),
    num("query-explain-negative", _query("--explain", "-1"), "--explain", setup=_copy_cache, needs=("cache",)),
    num("query-metric-unknown", _query("--metric", "euclid"), "euclid", setup=_copy_cache, needs=("cache",)),
    num("itrain-steps-negative", _itrain("--steps", "-1"), "steps"),
    num("itrain-batch-size-zero", _itrain("--batch-size", "0"), "batch"),
    num("itrain-lr-nan", _itrain("--lr", "nan"), "lr"),
    num("itrain-lr-negative", _itrain("--lr", "-0.1"), "lr"),
    num("itrain-density-zero", _itrain("--method", "random", "--density", "0"), "density"),
    num("itrain-density-above-one", _itrain("--method", "random", "--density", "5"), "density"),
    num("itrain-method-unknown", _itrain("--method", "lorra"), "lorra"),
    num("itrain-n-train-negative", _itrain("--n-train", "-1"), "--n-train"),
    num("itrain-max-length-zero", _itrain("--max-length", "0"), "max"),
    num("train-set-lr-list", ["train", "--set", "lr=[1, 2]", "--out", "{sb}/out/run"], "lr", heavy=False, needs=()),
    num("train-density-nan", ["train", "--density", "nan", "--out", "{sb}/out/run"], "density", heavy=False,
        needs=()),
    num("run-jobs-zero", run_suite_args("in/s.yaml", "--jobs", "0"), "--jobs", heavy=False, needs=(),
        setup=lambda c: c.write("in/s.yaml", suite_text(methods=("forward",)))),
    num("run-retries-negative", run_suite_args("in/s.yaml", "--retries", "-1"), "--retries", heavy=False, needs=(),
        setup=lambda c: c.write("in/s.yaml", suite_text(methods=("forward",)))),
    num("run-only-unknown-key", ["run", "{sb}/in/s.yaml", "--dry-run", "--only", "bogus=1"], "bogus", heavy=False,
        needs=(), setup=lambda c: c.write("in/s.yaml", suite_text(methods=("forward",)))),
    num("run-only-empty-value", ["run", "{sb}/in/s.yaml", "--dry-run", "--only", "method="], "--only",
        heavy=False, needs=(), setup=lambda c: c.write("in/s.yaml", suite_text(methods=("forward",)))),
    num("run-executor-unknown", run_suite_args("in/s.yaml", "--executor", "slurm"), "slurm", heavy=False,
        needs=(), setup=lambda c: c.write("in/s.yaml", suite_text(methods=("forward",)))),
    num("suite-name-with-nul", ["run", "{sb}/in/s.yaml"], "name", heavy=False, needs=(),
        setup=lambda c: c.write("in/s.yaml", suite_text(name='"a\\0b"', methods=("forward",))),
        note="a NUL in the name reaches open() as ValueError: exit 4 today"),
    Case(CLS, "ids-int-7-and-string-7", _cache(data="{sb}/in/data.jsonl"), setup=_ids(MIXED_IDS),
         needles=("{sb}/in/data.jsonl",), outputs=("out",), heavy=True,
         note="ids 7 and \"7\" print the same and are different keys: refuse (chosen), not rank them apart"),
    Case(CLS, "two-resumes-at-once", None, expect=(0, 2), runner=concurrent_runner(
         run_suite_args("in/s.yaml", "--resume")), setup=lambda c: c.write("in/s.yaml", THREE), check=_once_each,
         outputs=("out",), heavy=True, bound_s=300,
         note="two `run --resume` on one --out: each cell recorded exactly once (a second run may also refuse "
              "with 2 while the first holds the file)"),
    usage("usage-unknown-flag", ["train", "--bogus", "--out", "{sb}/out/run"], "--bogus"),
    usage("usage-unknown-flag-and-missing-required", ["train", "--bogus"], "--bogus",
          note="argparse reports the missing --out, not the misspelt flag"),
    usage("usage-missing-value", ["check", "--suite"], "--suite"),
    usage("usage-unknown-command", ["frobnicate"], "frobnicate"),
    usage("usage-no-command", [], "command"),
    usage("usage-not-a-number", ["train", "--steps", "ten", "--out", "{sb}/out/run"], "--steps"),
    usage("usage-influence-no-subcommand", ["influence"], "influence"),
    usage("usage-run-no-suite", ["run"], "suite"),
    usage("usage-eval-no-delta", ["eval", "--out", "{sb}/out/e"], "--delta"),
    usage("usage-query-typo-flag", ["influence", "query", "--cache", "x", "--instrucion", "a", "--generation",
                                    "b"], "--instrucion"),
    num("train-set-unknown-key-regression", ["train", *TINY_SET, "--set", "stepz=3", "--out", "{sb}/out/run"],
        "stepz", heavy=False, needs=()),
]
