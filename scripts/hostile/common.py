"""Shapes many cases share: a tiny training that saves somewhere, an eval of a spoiled delta, a suite file."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from hostile.fixtures import TINY_SET, TRAIN, edit_json, suite_text
from hostile.harness import Case

RANDOM = ["--method", "random", "--density", "0.05"]


def train_saving(target: str, extra: tuple = ()) -> list[str]:
    """`zobench train` of a tiny sparse run that keeps its result at ``target``."""
    return TRAIN + RANDOM + list(extra) + ["--save", target, "--out", "{sb}/out/run"]


def eval_delta(rel: str = "in/d") -> list[str]:
    return ["eval", "--delta", "{sb}/" + rel, "--out", "{sb}/out/e"]


def cache_with_delta(rel: str = "in/d", scope: str = "all") -> list[str]:
    return ["influence", "cache", "--delta", "{sb}/" + rel, "--data", "{fx}/data.jsonl", "--scope", scope,
            "--k", "16", "--max-length", "32", "--out", "{sb}/out/c"]


def delta_case(cls: str, name: str, fixture: str, spoil, argv=None, expect=(2,), needles=None, note: str = "",
               rel: str = "in/d", **kw) -> Case:
    """A copy of ``fixture`` at sb/``rel`` spoiled by ``spoil(path, ctx)``, then evaluated (or ``argv``)."""
    def setup(ctx):
        path = ctx.copy(fixture, rel)
        spoil(path, ctx)

    return Case(cls, name, argv or eval_delta(rel), expect=expect, setup=setup, outputs=("out",),
                needles=(("{sb}/" + rel,) if needles is None else needles), heavy=True, note=note,
                needs=(fixture,), **kw)


def meta_edit(how):
    """A spoil that rewrites delta.json with ``how(meta)``."""
    return lambda path, ctx: edit_json(path / "delta.json", how)


def set_in(keys: str, value):
    """``how`` for meta_edit: meta[k1][k2]... = value (dotted keys); ``DELETE`` removes the key."""
    def how(meta):
        *parents, last = keys.split(".")
        obj = meta
        for k in parents:
            obj = obj[k]
        if value is DELETE:
            obj.pop(last, None)
        else:
            obj[last] = value
    return how


DELETE = object()


def write_suite(ctx, rel: str, text: str | None = None, **defaults) -> Path:
    return ctx.write(rel, text if text is not None else suite_text(**defaults))


def run_suite_args(suite_rel: str, *extra: str) -> list[str]:
    return ["run", "{sb}/" + suite_rel, "--out", "{sb}/out/r", "--reports", "{sb}/out/rep", *extra]


def cell_ids(ctx, suite: Path) -> list[str]:
    """The cell ids of a suite, from `zobench run --dry-run` with the tree under test."""
    r = subprocess.run(ctx.argv(["run", str(suite), "--dry-run"]), cwd=ctx.work, env=ctx.env(),
                       capture_output=True, text=True, timeout=120)
    ids = [line.split()[0] for line in r.stdout.splitlines() if line and not line.endswith(" cells")]
    if r.returncode != 0 or not ids:
        raise RuntimeError(f"dry-run of {suite} failed: {r.stderr.strip()[-200:]}")
    return ids


def results_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def before_training(ctx, res) -> list[str]:
    """A refusal of an output location must come before the work whose result it would lose."""
    if res.rc == 2 and re.search(r"\bstep \d+/\d+", res.stderr):
        return ["refused only after training (the result was computed, then lost)"]
    return []


def tiny_set() -> list[str]:
    return list(TINY_SET)
