#!/usr/bin/env python
"""Run zobench against hostile and careless inputs and report which are not handled cleanly.

    python scripts/hostile_check.py                       # every case, against this checkout
    python scripts/hostile_check.py --tree /work/main     # against another zobench source tree
    python scripts/hostile_check.py --cheap               # only the cases that load no model (~3 min)
    python scripts/hostile_check.py --only save- --only git-   # names (or classes) containing these
    python scripts/hostile_check.py --list                # the cases, their expectations, no runs
    python scripts/hostile_check.py --json out.json       # also every row as JSON

Each case runs `python -m zobench.cli ...` with PYTHONPATH=TREE, HOME and TMPDIR inside a fresh sandbox,
HF_HUB_OFFLINE=1, one case at a time. A case is clean when: the exit code is the expected one; no
traceback is printed; on exit 2 stderr has at most 3 lines (2 for usage errors) and names the offending
file, flag or key; the command ended within its bound and under 3 GiB; no process it started is alive
2 s after it ended; no file outside its declared outputs was deleted or changed; no payload ran (marker
files); nothing tried to delete outside the sandbox (a guard stops that: scripts/hostile/guard).
Exit code of this script: 0 when every case that ran is clean, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile import all_cases  # noqa: E402
from hostile.fixtures import FixtureMissing, Fixtures  # noqa: E402
from hostile.harness import GUARD, GUARD_EXIT, Ctx, Run, compare, judge, make_sandbox, snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"loss": "Data loss", "code": "Code execution from a file", "model": "Silently wrong models",
           "bomb": "Resource bombs and hangs", "exit": "Wrong exit codes", "keep": "Must keep holding"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", default=str(ROOT), help="zobench source tree to test (default: this checkout)")
    p.add_argument("--python", default=sys.executable, help="interpreter with zobench's dependencies")
    p.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                   help="run cases whose name or class contains this (repeatable)")
    p.add_argument("--cheap", action="store_true", help="skip cases that load a model or run a cell")
    p.add_argument("--no-danger", action="store_true", help="skip cases aimed at deleting folders")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--json", default=None, metavar="FILE", help="write every row as JSON to FILE")
    p.add_argument("--workdir", default=None, help="where the run's sandboxes go (default: the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the sandboxes (default: removed)")
    p.add_argument("--fixtures", default=None, metavar="DIR",
                   help="build the valid fixtures there and reuse those already built (same tree only)")
    return p.parse_args(argv)


def select(args):
    cases = all_cases()
    if args.only:
        cases = [c for c in cases if any(s in c.name or s == c.cls for s in args.only)]
    if args.cheap:
        cases = [c for c in cases if not c.heavy]
    if args.no_danger:
        cases = [c for c in cases if not c.danger]
    return cases


def guard_works(run: Run) -> bool:
    """The deletion guard is loaded by the interpreter and stops a deletion outside the sandbox."""
    sb = Path(tempfile.mkdtemp(dir=run.root))
    decoy = run.root / "decoy"  # outside the probe's sandbox; deleted only if the guard is not there
    (decoy / "x").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(GUARD), HOSTILE_SANDBOX=str(sb), HOSTILE_GUARD_LOG=str(sb / "log"))
    r = subprocess.run([run.python, "-c", f"import shutil; shutil.rmtree({str(decoy)!r})"],
                       env=env, capture_output=True, timeout=60)
    return r.returncode == GUARD_EXIT and (sb / "log").exists() and decoy.exists()


def root_entries() -> set[str]:
    try:
        return set(os.listdir("/"))
    except OSError:
        return set()


def strays_in_root(before: set[str]) -> list[str]:
    """New entries in / (a stage directory of `--save /`): reported, and removed when they hold only a delta."""
    out = []
    for name in sorted(root_entries() - before):
        path = Path("/") / name
        out.append(str(path))
        files = {p.name for p in path.rglob("*")} if path.is_dir() else set()
        if name.startswith(".") and path.is_dir() and files <= {"delta.json", "delta.safetensors", "adapter",
                                                                  "adapter_config.json", "adapter_model.safetensors",
                                                                  "README.md"}:
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".zobench-probe-") and path.is_file():
            path.unlink()
    return out


def run_case(run: Run, case, guard_ok: bool) -> dict:
    row = {"class": case.cls, "name": case.name, "expected": case.expected(), "note": case.note}
    ctx = Ctx(run, case)
    row["command"] = " ".join(["zobench", *map(ctx.fmt, case.argv)]) if case.argv is not None else "(runner)"
    if case.danger and not guard_ok:
        return dict(row, status="skipped", why=["the deletion guard is not active"])
    make_sandbox(ctx)
    try:
        if case.setup:
            case.setup(ctx)
    except FixtureMissing as e:
        return dict(row, status="skipped", why=[str(e)])
    except Exception as e:  # the harness's own problem, not zobench's
        return dict(row, status="harness error", why=[f"setup: {type(e).__name__}: {e}"])
    before = snapshot(ctx.sb, case.outputs)
    root_before = root_entries() if case.danger else None
    res = case.runner(ctx) if case.runner else ctx.run_once()
    changes = compare(before, snapshot(ctx.sb, case.outputs)) if ctx.sb.exists() else ["deleted the whole sandbox"]
    strays = strays_in_root(root_before) if root_before is not None else []
    why = judge(ctx, res, changes, strays)
    err_lines = len([ln for ln in res.stderr.splitlines() if ln.strip()])
    row.update(status="clean" if not why else "NOT clean", why=why, rc=res.rc, stderr_lines=err_lines,
               seconds=res.seconds, peak_rss_mib=round(res.peak_rss / 2**20), notes=res.notes,
               stderr_tail=res.stderr.strip()[-600:])
    if not run.keep:
        shutil.rmtree(ctx.dir, ignore_errors=True)
    return row


def markdown(rows: list[dict], tree: str, seconds: float) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("clean", "NOT clean", "skipped", "harness error")}
    lines = [f"# hostile inputs against {tree}", "",
             f"{len(rows)} cases in {seconds / 60:.1f} min: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
             "", "| class | case | expected | got (exit, stderr lines, s) | clean | why not |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        got = f"{r.get('rc')}, {r.get('stderr_lines', '-')}, {r.get('seconds', '-')}" if "rc" in r else "-"
        why = "; ".join(r["why"] + r.get("notes", [])).replace("|", "\\|").replace("\n", " ")
        clean = {"clean": "yes", "NOT clean": "**no**"}.get(r["status"], r["status"])
        lines.append(f"| {r['class']} | {r['name']} | {r['expected']} | {got} | {clean} | {why[:300]} |")
    bad = [r for r in rows if r["status"] == "NOT clean"]
    if bad:
        lines += ["", "## Not clean, by class", ""]
        for cls, title in CLASSES.items():
            mine = [r for r in bad if r["class"] == cls]
            if mine:
                lines.append(f"### {title} ({len(mine)})")
                lines += [f"- `{r['name']}`: {'; '.join(r['why'])}" for r in mine]
                lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = select(args)
    if args.list:
        for c in cases:
            flags = ",".join(f for f, on in (("heavy", c.heavy), ("danger", c.danger)) if on)
            print(f"{c.cls:5} {c.name:48} expect {c.expected():28} {flags:12} {c.note[:80]}")
        print(f"{len(cases)} cases")
        return 0
    if not cases:
        print("no case matches", file=sys.stderr)
        return 2
    tree = Path(args.tree).resolve()
    if not any((tree / "zobench" / cli).is_file() for cli in ("cli.py", "cli/__init__.py")):  # a module or a package
        print(f"--tree {tree}: no zobench/cli there", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="hostile-", dir=args.workdir))
    cache = os.environ.get("ZOBENCH_CACHE") or str(Path("~").expanduser() / ".cache" / "zobench")
    run = Run(root, tree, args.python, cache, Fixtures(Path(args.fixtures).resolve() if args.fixtures
                                                      else root / "fixtures"))
    run.keep = args.keep
    t0 = time.monotonic()
    print(f"hostile: {len(cases)} cases against {tree} (sandboxes in {root})", file=sys.stderr)
    guard_ok = guard_works(run)
    if not guard_ok:
        print("hostile: the deletion guard did not load: cases aimed at deleting folders are skipped",
              file=sys.stderr)
    wanted = {n for c in cases for n in c.needs}
    if wanted:
        print(f"hostile: building fixtures {sorted(wanted)}", file=sys.stderr)
        run.fixtures.build(run, wanted, log=lambda m: print(m, file=sys.stderr))
    rows = []
    for i, case in enumerate(cases, 1):
        row = run_case(run, case, guard_ok)
        rows.append(row)
        print(f"[{i}/{len(cases)}] {case.cls:5} {case.name:46} {row['status']:9} "
              f"exit={row.get('rc')} {row.get('seconds', '-')}s  {'; '.join(row['why'])[:150]}",
              file=sys.stderr, flush=True)
    seconds = time.monotonic() - t0
    print(markdown(rows, str(tree), seconds))
    if args.json:
        Path(args.json).write_text(json.dumps({"tree": str(tree), "seconds": round(seconds, 1),
                                               "fixtures_s": run.fixtures.seconds, "rows": rows}, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["status"] in ("clean", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
