"""Carry a long suite's progress between two checkouts: its records, predictions and mid-cell checkpoints.

    python scripts/sync_run.py SRC DST NAME      # e.g. ../claims-run . claims-v2, or . ../claims-run claims-v2

A suite that runs for days runs from a worktree pinned to one commit (so refactoring main does not change
the code under it), and the machine it runs on may be a fresh one each day. Its progress is three things in
``results/`` (``zobench run SUITE --out results``: the records go to ``results/NAME.jsonl``):

    NAME.jsonl          the records, one per finished cell, appended in order
    NAME.predictions/   one .npz per cell (a running cell's is rewritten at each dev evaluation)
    NAME.checkpoints/   one .json per running cell (``zobench.cell.checkpoint``): deleted when it finishes

Committing all three from the worktree into main lets a later session, on a new machine, copy them back into
a new worktree at the same commit and ``zobench run --resume`` from the last dev evaluation of the cell that
was running, not from step 0 of it.

What it refuses: DST's records must be a prefix of SRC's (the same lines, in order, and no more): a copy
never drops or rewrites a record already there, in either direction. It holds DST's one-writer lock (a
zobench run writing DST's records makes it stop), reads and writes through no symbolic link, and writes
each file whole through a fresh temporary one. Predictions are copied when new or changed and never
deleted, and a finished cell's only when they are the bytes its record names. Checkpoints are mirrored:
DST's copy of a checkpoint SRC no longer has (its cell finished, or restarted from step 0) is removed, and
only a ``CELL.json`` file there (what this script or zobench wrote) is ever removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

from zobench.errors import UserError
from zobench.files import atomic_write
from zobench.outdirs import output_lock

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CHECKPOINT = re.compile(r"[0-9a-f]{6,64}\.json")


class Refused(Exception):
    pass


def _no_link(path: Path) -> Path:
    """``path`` if it is not a symbolic link: a link in a checkout's results (git commits links) could make
    a copy overwrite, or a removal reach, a file outside it."""
    if path.is_symlink():
        raise Refused(f"{path} is a symbolic link; refusing to read or write through it")
    return path


def _write(dst: Path, data: bytes) -> None:
    """Atomically (``files.atomic_write``): a reader (or a kill) never sees half a file at ``dst``."""
    atomic_write(_no_link(dst), data, "synced file")


def _put(target: Path, data: bytes, done: list[str]) -> None:
    """``data`` at ``target`` unless it is there already."""
    if not target.exists() or _no_link(target).read_bytes() != data:
        _write(target, data)
        done.append(f"{target}: copied")


def _recorded_sha(lines: list[bytes]) -> dict[str, str]:
    """cell id -> the sha256 of the predictions file its latest record names."""
    out = {}
    for line in lines:
        try:
            rec = json.loads(line)
            out[rec["cell_id"]] = rec["predictions"]["sha256"]
        except (ValueError, KeyError, TypeError):
            continue
    return out


def sync(src_root: Path, dst_root: Path, name: str) -> list[str]:
    """Copy suite ``name``'s progress from ``src_root/results`` to ``dst_root/results``; the changes made."""
    if not NAME.fullmatch(name):
        raise Refused(f"suite name {name!r}: expected letters, digits, '.', '_' or '-'")
    src, dst = _no_link(src_root / "results"), _no_link(dst_root / "results")
    records = _no_link(src / f"{name}.jsonl")
    if not records.is_file():
        raise Refused(f"{records}: no such records file")
    dst.mkdir(parents=True, exist_ok=True)
    mine_path = _no_link(dst / f"{name}.jsonl")
    try:
        with output_lock(mine_path):  # no zobench run may be writing the destination meanwhile
            return _sync(src, dst, name, records, mine_path)
    except UserError as e:
        raise Refused(str(e)) from None


def _sync(src: Path, dst: Path, name: str, records: Path, mine_path: Path) -> list[str]:
    done: list[str] = []
    theirs = records.read_bytes().splitlines(keepends=True)
    if theirs and not theirs[-1].endswith(b"\n"):  # a record being appended right now: the next sync takes it
        theirs.pop()
    mine = mine_path.read_bytes().splitlines(keepends=True) if mine_path.exists() else []
    if theirs[:len(mine)] != mine:
        raise Refused(f"{mine_path} is not a prefix of {records} (a record there differs, or it has more): "
                      f"nothing copied")
    if len(theirs) > len(mine):
        _write(mine_path, b"".join(theirs))
        done.append(f"{mine_path}: {len(theirs) - len(mine)} record(s) added ({len(theirs)} in all)")

    named = _recorded_sha(theirs)
    preds_src, preds_dst = _no_link(src / f"{name}.predictions"), _no_link(dst / f"{name}.predictions")
    if preds_src.is_dir():
        preds_dst.mkdir(exist_ok=True)
        for f in sorted(preds_src.glob("*.npz")):
            data, want = _no_link(f).read_bytes(), named.get(f.stem)
            if want is not None and hashlib.sha256(data).hexdigest() != want:
                done.append(f"{f}: not the bytes its record names; left alone")
            else:
                _put(preds_dst / f.name, data, done)

    ck_src, ck_dst = _no_link(src / f"{name}.checkpoints"), _no_link(dst / f"{name}.checkpoints")
    keep = {f.name for f in ck_src.glob("*.json") if CHECKPOINT.fullmatch(f.name)} if ck_src.is_dir() else set()
    if keep:
        ck_dst.mkdir(exist_ok=True)
    for n in sorted(keep):
        _put(ck_dst / n, _no_link(ck_src / n).read_bytes(), done)
    if ck_dst.is_dir():
        for f in sorted(ck_dst.glob("*.json")):
            if CHECKPOINT.fullmatch(f.name) and f.name not in keep and not f.is_symlink():
                f.unlink()
                done.append(f"{f}: removed (its cell finished or restarted at {src.parent})")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="the checkout to copy from (its results/)")
    p.add_argument("dst", type=Path, help="the checkout to copy into")
    p.add_argument("name", help="the suite's results name (results/NAME.jsonl)")
    args = p.parse_args(argv)
    try:
        done = sync(args.src, args.dst, args.name)
    except (Refused, OSError, UserError) as e:
        print(f"sync_run: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(done) if done else "sync_run: nothing to copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
