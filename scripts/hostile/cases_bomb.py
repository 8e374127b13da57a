"""Resource bombs and hangs: inputs that cost unbounded memory or time, an unreachable cluster, signals.
Bad input must fail fast (exit 2 in seconds, memory bounded: a tree over 3 GiB is killed and reported);
large valid input must finish within a stated bound; a killed command must take its workers with it."""

from __future__ import annotations

import json
import os
import signal

from hostile.common import run_suite_args
from hostile.fixtures import ROWS, nested, suite_text
from hostile.harness import Case
from hostile.runners import after, all_of, path_exists, proc_with, signal_runner, timed_note

CLS = "bomb"
UNREACHABLE = "10.255.255.1:6379"


def _bomb_suite(use: str, levels: int = 9):
    """A suite whose description holds a billion-laughs alias tree (10**levels leaves), used by ``use``."""
    lines = ["name: bomb", "description:", '  - &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"  - &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    top = f"*a{levels - 1}"
    return "\n".join(lines) + "\n" + use.replace("BOMB", top)


def _suite(rel, text):
    return lambda ctx: ctx.write(rel, text)


def _query(cache="{sb}/in/cache"):
    return ["influence", "query", "--cache", cache, "--instruction", "Say the number 3", "--generation",
            "The number is 3.", "--top", "3"]


def _cache(data="{sb}/in/data.jsonl", *extra):
    return ["influence", "cache", "--model", "random:tiny-llama", "--data", data, "--scope", "all", "--k", "16",
            "--max-length", "32", "--out", "{sb}/out/c", *extra]


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def _data_with(first: str):
    return lambda ctx: ctx.write("in/data.jsonl", first + "\n" + _jsonl(ROWS[1:]))


def _cache_with(name: str, text: str):
    def setup(ctx):
        ctx.copy("cache", "in/cache")
        ctx.write(f"in/cache/{name}", text)
    return setup


def _huge_jsonl(ctx):
    row = dict(ROWS[0], output="bananas " * 4_000_000)  # 32 MB on one line
    ctx.write("in/data.jsonl", _jsonl([row, *ROWS[1:]]))


def _huge_tsv(ctx):
    rows = ["a fine film\t1", "a dull film\t0"] * 7 + ["so " * 10_000_000 + "good\t1", "bad\t0"]
    ctx.write("in/data/SST-2/train.tsv", "sentence\tlabel\n" + "\n".join(rows) + "\n")
    ctx.write("in/data/SST-2/dev.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")


def _many_records(n: int):
    def setup(ctx):
        ctx.copy("suite.yaml", "in/suite.yaml")
        first = json.loads(ctx.fx.path("results").read_text().splitlines()[0])
        first["suite_file"] = str(ctx.p("in/suite.yaml"))
        head, tail = json.dumps(dict(first, cell_id="@ID@")).split("@ID@", 1)
        with open(ctx.p("in/t.jsonl"), "w") as f:
            for i in range(n):
                f.write(f"{head}{i:012x}{tail}\n")
    return setup


def _timed(what):
    def check(ctx, res):
        timed_note(res, what)
        return []
    return check


def _fifo(rel):
    def setup(ctx):
        ctx.p(rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(ctx.p(rel))
    return setup


def _records_naming(suite_file):
    def setup(ctx):
        lines = ctx.fx.path("results").read_text().splitlines()
        recs = [dict(json.loads(line), suite_file=suite_file) for line in lines if line.strip()]
        ctx.write("in/t.jsonl", _jsonl(recs))
    return setup


def _big_data(ctx, n=240):
    ctx.write("in/data.jsonl", _jsonl({"instruction": f"Count to {i}", "input": "", "output": " ".join(
        map(str, range(i % 20 + 5)))} for i in range(n)))


def _matrix(ctx):
    seeds = ", ".join(map(str, range(1000)))
    lrs = ", ".join(f"{1e-6 * (i + 1):.3g}" for i in range(1000))
    ctx.write("in/s.yaml", suite_text(methods=("forward",)) + f"  seed: [{seeds}]\n  lr: [{lrs}]\n")


FWD = suite_text(methods=("forward",))
LONG = suite_text(methods=("random",), steps=1_000_000)
RAY_ENV = {"TMPDIR": "{rt}", "RAY_TMPDIR": "{rt}"}

YAML = [
    Case(CLS, "yaml-alias-bomb-in-description", ["run", "{sb}/in/s.yaml", "--dry-run"], bound_s=30,
         setup=_suite("in/s.yaml", _bomb_suite("")), needles=("{sb}/in/s.yaml",), expect=(0, 2),
         note="10**9 leaves from 800 bytes; str(description) expands them. Exit 0 (e.g. description must be a "
              "string -> 2) within 30 s; expanding is the bug"),
    Case(CLS, "yaml-alias-bomb-in-defaults-value", ["estimate", "{sb}/in/s.yaml"], bound_s=30,
         setup=_suite("in/s.yaml", _bomb_suite("defaults:\n  lr: BOMB\n")), needles=("{sb}/in/s.yaml",),
         note="the error message repr()s the value"),
    Case(CLS, "yaml-alias-bomb-in-matrix", ["run", "{sb}/in/s.yaml", "--dry-run"], bound_s=30,
         setup=_suite("in/s.yaml", _bomb_suite("matrix:\n  seed: BOMB\n")), needles=("{sb}/in/s.yaml",)),
    Case(CLS, "yaml-alias-bomb-in-budget-match", ["check", "--suite", "{sb}/in/s.yaml"], bound_s=30,
         setup=_suite("in/s.yaml", _bomb_suite("budgets:\n  - match: {method: BOMB}\n    peak_mib_max: 1\n")),
         needles=("{sb}/in/s.yaml",)),
    Case(CLS, "yaml-deep-list-100k", ["run", "{sb}/in/s.yaml", "--dry-run"], bound_s=30,
         setup=_suite("in/s.yaml", "name: deep\ndescription: " + nested(100_000) + "\n"),
         needles=("{sb}/in/s.yaml",)),
    Case(CLS, "yaml-deep-mapping-20k", ["estimate", "{sb}/in/s.yaml"], bound_s=30,
         setup=_suite("in/s.yaml", "name: deep\ndescription: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n"),
         needles=("{sb}/in/s.yaml",)),
    Case(CLS, "suite-million-cell-matrix", ["run", "{sb}/in/s.yaml", "--dry-run"], expect=(0, 2), bound_s=30,
         setup=_matrix, note="unsure: 1000 seeds x 1000 lrs; either refuse the size (2) or list them in 30 s"),
]

JSON = [
    Case(CLS, "json-deep-results-line", ["check", "{sb}/in/t.jsonl", "--suite", "{fx}/suite.yaml"], bound_s=30,
         setup=lambda c: c.write("in/t.jsonl", nested(100_000) + "\n"), needles=("{sb}/in/t.jsonl",),
         needs=("suite.yaml",)),
    Case(CLS, "json-deep-data-jsonl-line", _cache(), bound_s=30, setup=_data_with(nested(100_000)),
         needles=("{sb}/in/data.jsonl",)),
    Case(CLS, "json-deep-data-json-list", _cache("{sb}/in/data.json"), bound_s=30,
         setup=lambda c: c.write("in/data.json", "[" + nested(100_000) + "]"), needles=("{sb}/in/data.json",)),
    Case(CLS, "json-deep-cache-meta", _query(), bound_s=30, setup=_cache_with("meta.json", nested(100_000)),
         needles=("meta.json",), needs=("cache",)),
    Case(CLS, "json-deep-cache-spec", _query(), bound_s=30, setup=_cache_with("spec.json", nested(100_000)),
         needles=("spec.json",), needs=("cache",)),
    Case(CLS, "json-deep-cache-examples", _query(), bound_s=30,
         setup=_cache_with("examples.jsonl", nested(100_000) + "\n"), needles=("examples.jsonl",), needs=("cache",)),
]

BIG = [
    Case(CLS, "data-jsonl-32mb-line", _cache("{sb}/in/data.jsonl", "--n-train", "8"), expect=(0, 2), bound_s=90,
         setup=_huge_jsonl, outputs=("out",), heavy=True,
         note="one 32 MB response among 8 rows; --max-length 32 bounds the cost: done (0) or refused (2) in 90 s"),
    Case(CLS, "sst2-tsv-30mb-line", ["train", "--model", "random:tiny-llama", "--method", "forward", "--data-dir",
         "{sb}/in/data", "--set", "n_train=16", "--set", "n_dev=0", "--set", "n_test=0", "--set", "max_length=32",
         "--set", "batch_size=4", "--set", "eval_before=false", "--set", "eval_after=false", "--out",
         "{sb}/out/run"], expect=(0, 2), bound_s=90, setup=_huge_tsv, outputs=("out",), heavy=True),
    Case(CLS, "check-10k-records", ["check", "{sb}/in/t.jsonl", "--suite", "{sb}/in/suite.yaml"], expect=(0,),
         bound_s=30, setup=_many_records(10_000), check=_timed("check 10k"), heavy=True, needs=("results",)),
    Case(CLS, "check-100k-records", ["check", "{sb}/in/t.jsonl", "--suite", "{sb}/in/suite.yaml"], expect=(0,),
         bound_s=30, setup=_many_records(100_000), check=_timed("check 100k"), heavy=True, needs=("results",),
         note="100,000 copies of a real ~3.8 KB record (about 380 MB)"),
    Case(CLS, "report-10k-records", ["report", "{sb}/in/t.jsonl", "--out", "{sb}/out/rep"], expect=(0,),
         bound_s=60, setup=_many_records(10_000), check=_timed("report 10k"), outputs=("out",), heavy=True,
         needs=("results",)),
    Case(CLS, "check-results-is-a-fifo", ["check", "{sb}/in/t.jsonl", "--suite", "{fx}/suite.yaml"], bound_s=15,
         setup=_fifo("in/t.jsonl"), needles=("{sb}/in/t.jsonl",), needs=("suite.yaml",)),
    Case(CLS, "check-results-is-dev-zero", ["check", "/dev/zero", "--suite", "{fx}/suite.yaml"], bound_s=20,
         needles=("/dev/zero",), needs=("suite.yaml",), note="an endless file: read whole, it eats all memory"),
    Case(CLS, "suite-is-a-fifo", ["run", "{sb}/in/s.yaml", "--dry-run"], bound_s=15, setup=_fifo("in/s.yaml"),
         needles=("{sb}/in/s.yaml",)),
    Case(CLS, "instruction-data-is-dev-zero", _cache("/dev/zero"), bound_s=20, needles=("/dev/zero",)),
    Case(CLS, "records-name-dev-zero-as-suite", ["check", "{sb}/in/t.jsonl"], bound_s=20,
         setup=_records_naming("/dev/zero"), needles=("/dev/zero",), needs=("results",)),
]

SIGNALS = [
    Case(CLS, "ray-unreachable-address-run", run_suite_args("in/s.yaml", "--executor", "ray", "--address",
         UNREACHABLE), setup=_suite("in/s.yaml", FWD), needles=(UNREACHABLE,), bound_s=60, outputs=("out",),
         env=RAY_ENV, heavy=True, note="nobody serves it: one line within 60 s"),
    Case(CLS, "ray-unreachable-address-sigterm", None, expect=(130,), setup=_suite("in/s.yaml", FWD),
         runner=signal_runner(run_suite_args("in/s.yaml", "--executor", "ray", "--address", UNREACHABLE),
                              after(8),
                              signal.SIGTERM, within=5),
         outputs=("out",), env=RAY_ENV, heavy=True, bound_s=60, note="SIGTERM while it tries to connect: gone in 5 s"),
    Case(CLS, "ray-unreachable-address-influence-cache", _cache("{fx}/data.jsonl", "--executor", "ray",
         "--address", UNREACHABLE), needles=(UNREACHABLE,), bound_s=60, outputs=("out",), env=RAY_ENV, heavy=True,
         needs=("data.jsonl",)),
    Case(CLS, "ray-private-run-sigkill", None, expect=(-9,), setup=_suite("in/s.yaml", LONG),
         runner=signal_runner(run_suite_args("in/s.yaml", "--executor", "ray"),
                              proc_with("zobench.executors.child"), signal.SIGKILL, within=10, settle=2),
         outputs=("out",), env=RAY_ENV, heavy=True, bound_s=180,
         note="the driver killed outright: Ray's daemons and the cell must not live on"),
    Case(CLS, "influence-cache-workers-sigkill", None, expect=(-9,), setup=_big_data,
         runner=signal_runner(_cache("{sb}/in/data.jsonl", "--workers", "2"),
                              all_of(proc_with("spawn_main"), path_exists("out/c/meta.json")),
                              signal.SIGKILL, within=10, settle=5),
         outputs=("out",), heavy=True, bound_s=180,
         note="daemon workers are not stopped by SIGKILL of their parent: they keep writing the cache"),
    Case(CLS, "influence-cache-sigterm", None, expect=(130,), setup=_big_data,
         runner=signal_runner(_cache("{sb}/in/data.jsonl"), path_exists("out/c/meta.json"), signal.SIGTERM,
                              within=10, settle=2),
         outputs=("out",), heavy=True, bound_s=180),
]

CASES = YAML + JSON + BIG + SIGNALS
