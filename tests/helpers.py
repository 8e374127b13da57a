"""Helpers for tests of the command line: running a command (in this process, or in a child the machine
refuses something to: a full disk, a permission)."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def limit_file_size(nbytes: int):
    """A ``preexec_fn``: files of the child may not grow beyond ``nbytes``. The kernel then lets part of a
    write through (a short write, as on a nearly full filesystem) and refuses the rest with EFBIG."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def unprivileged() -> list[str]:
    """A command prefix that makes permission bits apply: root normally ignores them (CAP_DAC_OVERRIDE),
    so as root the child runs without the capabilities that bypass them."""
    if os.geteuid() != 0:
        return []
    if not Path("/usr/bin/setpriv").exists():
        pytest.skip("running as root without setpriv: permission bits cannot be tested")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def zobench(*args, cwd=ROOT, prefix=(), preexec_fn=None) -> subprocess.CompletedProcess:
    """The command's exit code and output. In this process (``cli.main``, its output captured: a fresh
    interpreter per case cost ~3 s, and tests/test_cli_imports.py covers what a fresh one imports), or in
    a child process where the machine must refuse something to it (``prefix``: no permission override;
    ``preexec_fn``: a file size limit)."""
    if prefix or preexec_fn is not None:
        return subprocess.run([*prefix, sys.executable, "-m", "zobench.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=600, cwd=cwd, preexec_fn=preexec_fn,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    from zobench.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's own refusals
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
