"""The light commands import no torch: a dry run, a report and a check on records start in a fraction of a
second and run where torch is not installed. Each runs in a fresh interpreter, which then says whether
torch was imported and, if it was, from where in zobench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tests" / "data" / "report_fixture.jsonl"
SMOKE = ROOT / "suites" / "smoke.yaml"

# Runs the command in-process, noting the zobench frames that first asked for torch, then prints one JSON
# line: the exit code, whether torch is in sys.modules, that chain.
PROBE = r"""
import json, sys, traceback

chain = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not chain:
            chain.extend(f"{f.filename.rsplit('/zobench/', 1)[-1]}:{f.lineno} {f.name}"
                         for f in traceback.extract_stack() if "/zobench/" in f.filename)
        return None

sys.meta_path.insert(0, Watch())
from zobench.cli import main

try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("\n" + json.dumps({"code": code, "torch": "torch" in sys.modules, "chain": chain}))
"""


def probe(*args, cwd: Path = ROOT) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       check=False, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


CASES = {
    "help": (["--help"], {0}),
    "run --dry-run": (["run", SMOKE, "--dry-run"], {0}),
    "report": (["report", RESULTS, "--out", "{tmp}"], {0}),
    "check --measured-only": (["check", RESULTS, "--measured-only", "--suite", SMOKE], {0, 1}),
    "run --dry-run (influence suite)": (["run", ROOT / "suites" / "influence.yaml", "--dry-run"], {0}),
}


@pytest.mark.parametrize("args, codes", list(CASES.values()), ids=list(CASES))
def test_light_commands_import_no_torch(args, codes, tmp_path):
    out = probe(*[str(a).replace("{tmp}", str(tmp_path)) for a in args])
    assert out["code"] in codes, out
    assert not out["torch"], "torch imported by: " + " <- ".join(reversed(out["chain"]))


def test_a_command_is_chosen_from_its_first_word_as_argparse_reads_it():
    from zobench.cli import chosen

    assert chosen(["report", "r.jsonl"]) == "report"
    assert chosen(["--bogus", "check", "r.jsonl"]) == "check"
    assert chosen(["-h", "train"]) == "train"
    assert chosen(["trian", "report"]) is None and chosen([]) is None and chosen(["--help"]) is None
