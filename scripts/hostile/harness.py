"""The machinery of the hostile-input harness: a case, its sandbox, running one command and judging it.

A case runs in a sandbox of its own (``<run>/cases/<name>/sb``)::

    sb/a/work/        the command's working directory (sentinel: notes.txt)
    sb/a/keep.txt     sentinel one level up (what `--save ..` would take with it)
    sb/home/          a fake $HOME (sentinels .bashrc, docs/thesis.txt)
    sb/other/         files the command has no business touching (data.csv)
    sb/in/            the case's input files (copied fixtures, corrupted)
    sb/markers/       where payloads write when they run (must stay empty)
    sb/tmp/           $TMPDIR

Every file under sb (but tmp/, markers/, home/.cache and the case's declared outputs) is snapshotted
before and after: a deleted or changed file is data loss. Each command runs in a new session, with a
token in its environment; any process that still carries the token 2 s after the command ended was left
behind (and is killed). Deletions outside the sandbox are stopped by guard/sitecustomize.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

HERE = Path(__file__).resolve().parent
GUARD = HERE / "guard"
MEM_LIMIT = 3 * 2**30      # RSS of a command's whole tree above this is a memory bomb: killed
GUARD_EXIT = 97
SENTINELS = {"a/work/notes.txt": "my notes\n", "a/keep.txt": "keep me\n", "home/.bashrc": "export PS1='$ '\n",
             "home/docs/thesis.txt": "chapter 1\n" * 50, "other/data.csv": "x,y\n1,2\n"}
SKIP = ("tmp", "markers", "home/.cache", "home/.config")


@dataclass
class Result:
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    timed_out: bool = False
    killed_for_memory: bool = False
    peak_rss: int = 0
    leftovers: list[str] = field(default_factory=list)
    guard: str = ""
    notes: list[str] = field(default_factory=list)   # extra facts a custom runner measured
    why: list[str] = field(default_factory=list)     # reasons a custom runner found it not clean


@dataclass
class Case:
    cls: str                                   # loss | code | model | bomb | exit | keep
    name: str
    argv: list[str] | None = None              # zobench arguments; {sb} {work} {home} {fx} {py} expanded
    expect: tuple[int, ...] = (2,)
    needles: tuple = ()                        # each a string or a tuple of alternatives, in stderr on exit 2
    setup: Callable | None = None              # setup(ctx): write the case's inputs
    runner: Callable | None = None             # runner(ctx) -> Result, instead of running argv once
    check: Callable | None = None              # check(ctx, result) -> [reasons it is not clean]
    bound_s: float = 60.0
    outputs: tuple[str, ...] = ()              # sandbox-relative paths the command may change
    max_err_lines: int = 3
    heavy: bool = False                        # loads a model or runs a cell (not in --cheap)
    danger: bool = False                       # could delete real files without the guard
    cwd: str = "a/work"
    env: dict = field(default_factory=dict)
    note: str = ""                             # why this expectation (and any doubt)
    needs: tuple[str, ...] = ()                # fixtures it copies

    def expected(self) -> str:
        codes = "/".join(map(str, self.expect))
        return codes + (" + names the file/key" if self.needles and 2 in self.expect else "")


class Ctx:
    """Paths and helpers of one case's run."""

    def __init__(self, run: "Run", case: Case):
        self.run, self.case = run, case
        self.dir = run.root / "cases" / case.name
        self.sb = self.dir / "sb"
        self.work, self.home, self.markers = self.sb / "a" / "work", self.sb / "home", self.sb / "markers"
        self.token = uuid.uuid4().hex
        self.guard_log = self.dir / "guard.log"
        self.fx = run.fixtures

    def p(self, rel: str) -> Path:
        return self.sb / rel

    def fmt(self, s: str) -> str:
        return s.format(sb=self.sb, work=self.work, home=self.home, fx=self.fx.root, py=self.run.python,
                        markers=self.markers, rt=self.run.root / "rt")

    def copy(self, fixture: str, rel: str) -> Path:
        """A fixture (a built delta, cache, results file) copied to sb/rel."""
        src, dst = self.fx.path(fixture), self.p(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst)
        return dst

    def write(self, rel: str, data: str | bytes) -> Path:
        path = self.p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
        return path

    def env(self, extra: dict | None = None) -> dict:
        run = self.run
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTILE_", "ZOBENCH_DEBUG"))}
        allowed = [run.cache, "/dev/shm", "/tmp/ray", str(run.root / "mpl"), str(run.root / "rt")]
        (run.root / "rt").mkdir(exist_ok=True)  # Ray's temp dir: short, so its socket paths fit
        env.update(HOME=str(self.home), TMPDIR=str(self.sb / "tmp"), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", ZOBENCH_CACHE=run.cache, MPLCONFIGDIR=str(run.root / "mpl"),
                   PYTHONPATH=os.pathsep.join([str(GUARD), str(run.tree)]), PYTHONDONTWRITEBYTECODE="1",
                   HOSTILE_TOKEN=self.token, HOSTILE_SANDBOX=str(self.sb), HOSTILE_GUARD_LOG=str(self.guard_log),
                   HOSTILE_ALLOWED=os.pathsep.join(allowed), RAY_USAGE_STATS_ENABLED="0",
                   TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
        env.update({k: self.fmt(v) for k, v in {**self.case.env, **(extra or {})}.items()})
        return env

    def argv(self, args: list[str]) -> list[str]:
        return [self.run.python, "-m", "zobench.cli", *[self.fmt(a) for a in args]]

    # -- processes ---------------------------------------------------------------------------------
    def start(self, args: list[str], cwd: str | None = None, tag: str = "cmd", env: dict | None = None):
        """Start ``zobench ARGS`` in a new session; returns (Popen, stdout path, stderr path)."""
        out, err = self.dir / f"{tag}.stdout", self.dir / f"{tag}.stderr"
        proc = subprocess.Popen(self.argv(args), cwd=self.p(cwd or self.case.cwd), env=self.env(env),
                                stdin=subprocess.DEVNULL, stdout=open(out, "wb"), stderr=open(err, "wb"),
                                start_new_session=True)
        return proc, out, err

    def wait(self, proc, bound: float, res: Result, t0: float | None = None) -> Result:
        """Wait for ``proc`` within ``bound`` s, watching its tree's memory; fills rc/seconds/timed_out."""
        t0 = t0 or time.monotonic()
        last = 0.0
        while True:
            rc = proc.poll()
            now = time.monotonic()
            if rc is not None:
                break
            if now - t0 > bound:
                res.timed_out = True
                kill_group(proc.pid)
                proc.wait()
                break
            if now - last > 0.3:
                last = now
                rss = tree_rss(proc.pid)
                res.peak_rss = max(res.peak_rss, rss)
                if rss > MEM_LIMIT:
                    res.killed_for_memory = True
                    kill_group(proc.pid)
                    proc.wait()
                    break
            time.sleep(0.05)
        res.seconds = round(time.monotonic() - t0, 2)
        res.rc = proc.returncode
        return res

    def finish(self, res: Result, tags=("cmd",)) -> Result:
        """Read outputs, look for processes left behind, kill them."""
        for tag in tags:
            res.stdout += _read(self.dir / f"{tag}.stdout")
            res.stderr += _read(self.dir / f"{tag}.stderr")
        res.leftovers = self.leftovers()
        if self.guard_log.exists():
            res.guard = self.guard_log.read_text().strip()
        return res

    def leftovers(self, grace: float = 2.0) -> list[str]:
        found = token_procs(self.token)
        deadline = time.monotonic() + grace
        while found and time.monotonic() < deadline:
            time.sleep(0.2)
            found = token_procs(self.token)
        names = [_describe(p) for p in found]
        for p in found:
            try:
                p.kill()
            except psutil.Error:
                pass
        return names

    def run_once(self, args: list[str] | None = None, bound: float | None = None, cwd: str | None = None) -> Result:
        proc, _, _ = self.start(args if args is not None else self.case.argv, cwd)
        res = self.wait(proc, bound or self.case.bound_s, Result())
        res = self.finish(res)  # leftovers first: killing the group would hide them
        kill_group(proc.pid)
        return res


@dataclass
class Run:
    root: Path          # the harness run's folder (cases/, fixtures/)
    tree: Path          # the zobench source tree under test
    python: str
    cache: str          # ZOBENCH_CACHE for every command
    fixtures: object = None


# -- sandbox and snapshots -----------------------------------------------------------------------------

def make_sandbox(ctx: Ctx) -> None:
    if ctx.dir.exists():
        shutil.rmtree(ctx.dir, ignore_errors=True)
    for rel, text in SENTINELS.items():
        ctx.write(rel, text)
    for d in ("in", "markers", "tmp", "home/.cache"):
        ctx.p(d).mkdir(parents=True, exist_ok=True)


def snapshot(sb: Path, outputs: tuple[str, ...]) -> dict[str, tuple]:
    skip = tuple(str(sb / s) for s in (*SKIP, *outputs))
    snap = {}
    for dirpath, dirnames, filenames in os.walk(sb):
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if _under(full, skip):
                continue
            if os.path.islink(full):
                snap[os.path.relpath(full, sb)] = ("link", os.readlink(full))
            else:
                keep.append(d)
                snap[os.path.relpath(full, sb)] = ("dir",)
        dirnames[:] = keep
        for f in filenames:
            full = os.path.join(dirpath, f)
            if _under(full, skip):
                continue
            rel = os.path.relpath(full, sb)
            try:
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    snap[rel] = ("link", os.readlink(full))
                elif stat.S_ISREG(st.st_mode):
                    snap[rel] = ("file", st.st_size, st.st_mtime_ns, _hash(full))
                else:  # a FIFO or socket: opening it could block
                    snap[rel] = ("special", stat.S_IFMT(st.st_mode))
            except OSError:
                snap[rel] = ("unreadable",)
    return snap


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def _hash(path: str) -> str:
    h = hashlib.sha1()
    try:
        if os.path.getsize(path) > 64 * 2**20:
            return "big"
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return "?"
    return h.hexdigest()


def compare(before: dict, after: dict) -> list[str]:
    """What changed among the entries that existed before: deleted, changed, replaced."""
    out = []
    for rel, was in sorted(before.items()):
        now = after.get(rel)
        if now is None:
            out.append(f"deleted {rel}")
        elif now != was:
            if was[0] == "file" and now[0] == "file" and was[3] == now[3]:
                continue  # same bytes, only the time: not a loss
            out.append(f"changed {rel}")
    return out


# -- processes -------------------------------------------------------------------------------------

def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def tree_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def token_procs(token: str) -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get("HOSTILE_TOKEN") == token:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:80]}"
    except psutil.Error:
        return str(p.pid)


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    if len(data) > 200_000:
        data = data[:100_000] + b"\n...[cut]...\n" + data[-100_000:]
    return data.decode("utf-8", "replace")


# -- judging -----------------------------------------------------------------------------------------

def judge(ctx: Ctx, res: Result, changes: list[str], strays: list[str]) -> list[str]:
    case, why = ctx.case, []
    err_lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if res.guard:
        why.append(f"tried to delete outside the sandbox (blocked): {res.guard.splitlines()[0]}")
    if res.killed_for_memory:
        why.append(f"memory bomb: killed at {res.peak_rss / 2**30:.1f} GiB")
    elif res.timed_out:
        why.append(f"hang: still running after {case.bound_s:.0f} s (killed)")
    elif res.rc not in case.expect:
        why.append(f"exit {res.rc}, expected {'/'.join(map(str, case.expect))}"
                   + (f": {_gist(err_lines)}" if err_lines else ""))
    if "Traceback" in res.stdout or "Traceback" in res.stderr:
        why.append("a traceback was printed")
    if res.rc == 2 and 2 in case.expect and not res.timed_out:
        if len(err_lines) > case.max_err_lines:
            why.append(f"{len(err_lines)} lines on stderr (at most {case.max_err_lines})")
        for needle in case.needles:
            alts = (needle,) if isinstance(needle, str) else tuple(needle)
            alts = tuple(ctx.fmt(a) for a in alts)
            if not any(a in res.stderr for a in alts):
                why.append(f"message does not name {alts[0]!r}")
    if res.leftovers:
        why.append(f"{len(res.leftovers)} process(es) left behind: {res.leftovers[0]}")
    if changes:
        why.append(f"data loss: {', '.join(changes[:3])}" + (f" (+{len(changes) - 3})" if len(changes) > 3 else ""))
    marks = sorted(p.name for p in ctx.markers.iterdir()) if ctx.markers.is_dir() else []
    if marks:
        why.append(f"payload ran: {', '.join(marks)}")
    if strays:
        why.append(f"left files outside the sandbox: {', '.join(strays)}")
    why.extend(res.why)
    if case.check and not res.timed_out:
        why.extend(case.check(ctx, res))
    return why


def _gist(lines: list[str]) -> str:
    line = lines[-1]
    return line[:160] + ("..." if len(line) > 160 else "")
