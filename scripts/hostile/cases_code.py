"""Code execution from a file: a delta, suite or results file (or the git folder a suite sits in) must never
choose what is imported or run. Every payload writes a marker file under sb/markers when it runs."""

from __future__ import annotations

import json
import os
import subprocess
import time

from hostile.common import cache_with_delta, eval_delta, run_suite_args, write_suite
from hostile.fixtures import TRAIN, edit_json, evil_model, suite_text
from hostile.harness import Case

CLS = "code"


def _evil(ctx, tag):
    return evil_model(ctx.p("in/evil"), ctx.markers / f"PWNED-{tag}", ctx.run.cache)


def _delta_naming_evil(trust: bool, where: str = "config"):
    def setup(ctx):
        d = ctx.copy("sparse", "in/d")
        evil = str(_evil(ctx, "delta"))

        def how(meta):
            if where == "config":
                meta["config"].update(model=evil, trust_remote_code=trust)
            else:
                meta["base"]["model"] = evil
        edit_json(d / "delta.json", how)
    return setup


def _trusting_suite(ctx, rel="in/s.yaml"):
    evil = _evil(ctx, "suite")
    return write_suite(ctx, rel, suite_text(methods=("forward",), model=str(evil), trust_remote_code=True))


def _results_naming_suite(ctx):
    suite = _trusting_suite(ctx)
    src = ctx.fx.path("results")
    lines = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    for rec in lines:
        rec["suite_file"] = str(suite)
    ctx.write("in/t.jsonl", "".join(json.dumps(r) + "\n" for r in lines))


# -- git folders -------------------------------------------------------------------------------------

def _git(ctx, cwd, *args):
    env = {"HOME": str(ctx.home), "PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "-c", "user.name=h", "-c", "user.email=h@h", "-c", "core.fsmonitor=false", *args],
                   cwd=cwd, env=env, check=True, capture_output=True)


def _repo(ctx, rel="in/repo", suite_rel="s.yaml"):
    repo = ctx.p(rel)
    repo.mkdir(parents=True, exist_ok=True)
    _git(ctx, repo, "init", "-q")
    suite = write_suite(ctx, f"{rel}/{suite_rel}", suite_text(methods=("forward",)))
    _git(ctx, repo, "add", "-A")
    _git(ctx, repo, "commit", "-qm", "suite")
    later = time.time() + 5  # the index's stat data no longer matches: git must refresh (and write) it
    os.utime(suite, (later, later))
    return repo


def _git_payload(kind):
    def setup(ctx):
        marker = ctx.markers / f"PWNED-git-{kind}"
        cmd = f"touch {marker}"
        repo = _repo(ctx, "in/repo", "sub/s.yaml" if kind == "parent-repo" else "s.yaml")
        config = repo / ".git" / "config"
        if kind in ("fsmonitor", "parent-repo"):
            _git(ctx, repo, "config", "core.fsmonitor", f"{cmd}; false")
        elif kind == "include":
            ctx.write("in/evil.gitconfig", f"[core]\n\tfsmonitor = {cmd}; false\n")
            _git(ctx, repo, "config", "include.path", str(ctx.p("in/evil.gitconfig")))
        elif kind in ("hook", "hooks-path"):
            hooks = repo / ".git" / "hooks" if kind == "hook" else ctx.p("in/hooks")
            hooks.mkdir(parents=True, exist_ok=True)
            for name in ("post-index-change", "post-checkout", "reference-transaction"):
                (hooks / name).write_text(f"#!/bin/sh\n{cmd}-{name}\n")
                (hooks / name).chmod(0o755)
            if kind == "hooks-path":
                _git(ctx, repo, "config", "core.hooksPath", str(hooks))
        elif kind == "filter":
            ctx.write("in/repo/.gitattributes", "* filter=evil\n")
            _git(ctx, repo, "add", ".gitattributes")
            _git(ctx, repo, "commit", "-qm", "attributes")
            _git(ctx, repo, "config", "filter.evil.clean", f"{cmd}; cat")
            later = time.time() + 10
            os.utime(repo / "s.yaml", (later, later))
        elif kind == "gitdir-file":
            # the suite's folder has a .git *file* pointing at a repository elsewhere, which has the payload
            other = _repo(ctx, "in/elsewhere")
            _git(ctx, other, "config", "core.fsmonitor", f"{cmd}; false")
            proj = ctx.p("in/proj")
            write_suite(ctx, "in/proj/s.yaml", suite_text(methods=("forward",)))
            (proj / ".git").write_text(f"gitdir: {other / '.git'}\n")
        assert config.exists()
    return setup


def _git_case(kind, note):
    suite = {"parent-repo": "in/repo/sub/s.yaml", "gitdir-file": "in/proj/s.yaml"}.get(kind, "in/repo/s.yaml")
    return Case(CLS, f"git-{kind}-in-suite-folder", run_suite_args(suite), expect=(0,),
                setup=_git_payload(kind), outputs=("out", "in/repo/.git", "in/elsewhere/.git"), heavy=True,
                bound_s=120, note=note)


CASES = [
    Case(CLS, "delta-config-names-remote-code-model", eval_delta(), setup=_delta_naming_evil(True),
         needles=("{sb}/in/d",), outputs=("out",), heavy=True, needs=("sparse",),
         note="delta.json config: {model: <dir with auto_map>, trust_remote_code: true}; only the command "
              "line may turn trust on"),
    Case(CLS, "delta-config-names-other-model", eval_delta(), setup=_delta_naming_evil(False),
         needles=("{sb}/in/d",), outputs=("out",), heavy=True, needs=("sparse",),
         note="trust off: transformers refuses the custom code; that must be exit 2, not 4"),
    Case(CLS, "delta-base-model-names-remote-code-model", cache_with_delta(), setup=_delta_naming_evil(False, "base"),
         needles=("{sb}/in/d",), outputs=("out",), heavy=True, needs=("sparse", "data.jsonl"),
         note="influence cache without --model loads the model the delta names"),
    Case(CLS, "suite-trust-remote-code-run", run_suite_args("in/s.yaml"), expect=(0, 2, 3),
         setup=_trusting_suite, outputs=("out",), heavy=True, bound_s=120,
         note="trust_remote_code: true in a suite's defaults must not be honoured (a failed cell or exit 2)"),
    Case(CLS, "suite-trust-remote-code-estimate", ["estimate", "{sb}/in/s.yaml"], expect=(0, 2),
         setup=_trusting_suite, heavy=True, note="estimate builds the config with AutoConfig"),
    Case(CLS, "suite-trust-remote-code-check", ["check", "--suite", "{sb}/in/s.yaml"], expect=(0, 1, 2),
         setup=_trusting_suite, heavy=True, note="check --suite estimates every cell"),
    Case(CLS, "results-name-a-trusting-suite", ["check", "{sb}/in/t.jsonl"], expect=(0, 1, 2),
         setup=_results_naming_suite, heavy=True, needs=("results",),
         note="records' suite_file chooses the suite that check loads and estimates"),
    Case(CLS, "train-model-dir-with-custom-code", TRAIN + ["--model", "{sb}/in/evil", "--method", "forward",
         "--out", "{sb}/out/run"], setup=lambda c: _evil(c, "model"), needles=("{sb}/in/evil",),
         outputs=("out",), heavy=True, note="a model folder wanting custom code, trust off: exit 2, not 4"),
    _git_case("fsmonitor", "core.fsmonitor in .git/config: provenance (git status) must not run it"),
    _git_case("include", "core.fsmonitor through include.path"),
    _git_case("hook", ".git/hooks/post-index-change runs when git status rewrites the index"),
    _git_case("hooks-path", "core.hooksPath pointing at a folder of hooks"),
    _git_case("filter", "a clean filter driver (.gitattributes + filter.evil.clean)"),
    _git_case("gitdir-file", "a .git file redirecting to another repository with the payload"),
    _git_case("parent-repo", "the suite sits in a subfolder of a repository with the payload"),
]
