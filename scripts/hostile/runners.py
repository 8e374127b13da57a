"""Cases that need more than one command run to its end: a signal part-way, two runs at once, a resume."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from hostile.harness import Result, _read, kill_group, token_procs


def proc_with(*needles: str):
    """ready(): a process of this case (not the command itself) whose command line has all ``needles``."""
    def ready(ctx, proc) -> bool:
        for p in token_procs(ctx.token):
            if p.pid == proc.pid:
                continue
            try:
                line = " ".join(p.cmdline())
            except Exception:
                continue
            if all(n in line for n in needles):
                return True
        return False
    return ready


def path_exists(rel: str, lines: int = 0):
    def ready(ctx, proc) -> bool:
        path = ctx.p(rel)
        if not path.exists():
            return False
        return not lines or len([ln for ln in path.read_text().splitlines() if ln.strip()]) >= lines
    return ready


def after(seconds: float):
    def ready(ctx, proc) -> bool:
        return time.monotonic() - proc.started >= seconds
    return ready


def all_of(*conds):
    return lambda ctx, proc: all(c(ctx, proc) for c in conds)


def signal_runner(args, ready, sig, within: float, ready_timeout: float = 150, settle: float = 0.0,
                  then=None):
    """Start ``zobench ARGS``; once ``ready``, send ``sig`` to the command's own process (not its group:
    what it started is its business); it must end within ``within`` s. ``then(ctx, res)`` may run more."""
    def runner(ctx) -> Result:
        res = Result()
        proc, _, _ = ctx.start(args)
        proc.started = t0 = time.monotonic()
        sent = None
        while True:
            if proc.poll() is not None:
                res.why.append(f"it ended (exit {proc.returncode}) before {sig.name} could be sent")
                break
            if time.monotonic() - t0 > ready_timeout:
                res.why.append(f"not ready for {sig.name} after {ready_timeout:.0f} s")
                break
            if ready(ctx, proc):
                time.sleep(settle)
                os.kill(proc.pid, sig)
                sent = time.monotonic()
                break
            time.sleep(0.2)
        try:
            proc.wait(timeout=within if sent else 1)
        except subprocess.TimeoutExpired:
            if sent:
                res.why.append(f"still running {within:.0f} s after {sig.name}")
            res.timed_out = not sent
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if sent:
            res.notes.append(f"ended {time.monotonic() - sent:.1f} s after {sig.name}")
        res.rc, res.seconds = proc.returncode, round(time.monotonic() - t0, 2)
        res = ctx.finish(res)
        kill_group(proc.pid)
        if then is not None and not res.why:
            then(ctx, res)
        return res
    return runner


def concurrent_runner(args, n: int = 2, stagger: float = 0.5):
    """The same command ``n`` times at once; rc is the first non-zero exit (0 if all succeed)."""
    def runner(ctx) -> Result:
        res, procs = Result(), []
        t0 = time.monotonic()
        for i in range(n):
            proc, _, _ = ctx.start(args, tag=f"cmd{i}")
            procs.append(proc)
            time.sleep(stagger)
        for proc in procs:
            left = max(1.0, ctx.case.bound_s - (time.monotonic() - t0))
            try:
                proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                res.timed_out = True
                kill_group(proc.pid)
                proc.wait()
        codes = [p.returncode for p in procs]
        res.notes.append(f"exit codes {codes}")
        res.rc = next((c for c in codes if c != 0), 0)
        res.seconds = round(time.monotonic() - t0, 2)
        res = ctx.finish(res, tags=[f"cmd{i}" for i in range(n)])
        if res.rc:  # the message rules judge the run that refused; the others' progress is not its message
            res.stderr = "".join(_read(ctx.dir / f"cmd{i}.stderr") for i, c in enumerate(codes) if c == res.rc)
        for proc in procs:
            kill_group(proc.pid)
        return res
    return runner


def timed_note(res: Result, what: str) -> None:
    res.notes.append(f"{what}: {res.seconds:.1f} s, peak RSS {res.peak_rss / 2**20:.0f} MiB")
