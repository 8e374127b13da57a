"""Carry a long suite's progress between two checkouts: its records, predictions and mid-cell checkpoints.

    python scripts/sync_run.py SRC DST NAME      # e.g. ../claims-run . claims-v2, or . ../claims-run claims-v2

A suite that runs for days runs from a worktree pinned to one commit (so refactoring main does not change
the code under it), and the machine it runs on may be a fresh one each day. Its progress is three things in
``results/`` (``zobench run --out results/NAME.jsonl``):

    NAME.jsonl          the records, one per finished cell, appended in order
    NAME.predictions/   one .npz per cell (a running cell's is rewritten at each dev evaluation)
    NAME.checkpoints/   one .json per running cell (``zobench.cell.checkpoint``): deleted when it finishes

Committing all three from the worktree into main lets a later session, on a new machine, copy them back into
a new worktree at the same commit and ``zobench run --resume`` from the last dev evaluation of the cell that
was running, not from step 0 of it.

What it refuses: DST's records must be a prefix of SRC's (the same lines, in order, and no more): a copy
never drops or rewrites a record already there, in either direction. Predictions are copied when new or
changed and never deleted. Checkpoints are mirrored: DST's copy of a checkpoint SRC no longer has (its cell
finished, or restarted from step 0) is removed, and only a ``CELL.json`` file there (what this script or
zobench wrote) is ever removed.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CHECKPOINT = re.compile(r"[0-9a-f]{6,64}\.json")


class Refused(Exception):
    pass


def _copy(src: Path, dst: Path) -> None:
    """Atomically: a reader (or a kill) never sees half a file at ``dst``."""
    tmp = dst.with_name(f".{dst.name}.sync-tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def sync(src_root: Path, dst_root: Path, name: str) -> list[str]:
    """Copy suite ``name``'s progress from ``src_root/results`` to ``dst_root/results``; the changes made."""
    if not NAME.fullmatch(name):
        raise Refused(f"suite name {name!r}: expected letters, digits, '.', '_' or '-'")
    src, dst = src_root / "results", dst_root / "results"
    records = src / f"{name}.jsonl"
    if not records.is_file():
        raise Refused(f"{records}: no such records file")
    dst.mkdir(parents=True, exist_ok=True)
    done: list[str] = []

    theirs = records.read_bytes().splitlines(keepends=True)
    if theirs and not theirs[-1].endswith(b"\n"):  # a record being appended right now: the next sync takes it
        theirs.pop()
    mine_path = dst / f"{name}.jsonl"
    mine = mine_path.read_bytes().splitlines(keepends=True) if mine_path.exists() else []
    if theirs[:len(mine)] != mine:
        raise Refused(f"{mine_path} is not a prefix of {records} (a record there differs, or it has more): "
                      f"nothing copied")
    if len(theirs) > len(mine):
        tmp = mine_path.with_name(f".{mine_path.name}.sync-tmp")
        tmp.write_bytes(b"".join(theirs))
        os.replace(tmp, mine_path)
        done.append(f"{mine_path}: {len(theirs) - len(mine)} record(s) added ({len(theirs)} in all)")

    preds_src, preds_dst = src / f"{name}.predictions", dst / f"{name}.predictions"
    if preds_src.is_dir():
        preds_dst.mkdir(exist_ok=True)
        for f in sorted(preds_src.glob("*.npz")):
            target = preds_dst / f.name
            if not target.exists() or not filecmp.cmp(f, target, shallow=False):
                _copy(f, target)
                done.append(f"{target}: copied")

    ck_src, ck_dst = src / f"{name}.checkpoints", dst / f"{name}.checkpoints"
    keep = {f.name for f in ck_src.glob("*.json") if CHECKPOINT.fullmatch(f.name)} if ck_src.is_dir() else set()
    if keep:
        ck_dst.mkdir(exist_ok=True)
    for n in sorted(keep):
        target = ck_dst / n
        if not target.exists() or not filecmp.cmp(ck_src / n, target, shallow=False):
            _copy(ck_src / n, target)
            done.append(f"{target}: copied")
    if ck_dst.is_dir():
        for f in sorted(ck_dst.glob("*.json")):
            if CHECKPOINT.fullmatch(f.name) and f.name not in keep:
                f.unlink()
                done.append(f"{f}: removed (its cell finished or restarted at {src_root})")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="the checkout to copy from (its results/)")
    p.add_argument("dst", type=Path, help="the checkout to copy into")
    p.add_argument("name", help="the suite's results name (results/NAME.jsonl)")
    args = p.parse_args(argv)
    try:
        done = sync(args.src, args.dst, args.name)
    except (Refused, OSError) as e:
        print(f"sync_run: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(done) if done else "sync_run: nothing to copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
