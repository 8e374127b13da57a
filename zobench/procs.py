"""Processes zobench starts never outlive the process that started them.

A cell, a cache worker or a model conversion killed with its parent (``kill -9`` of ``zobench run``, a
scheduler's stop, a lost Ray worker) must not run on and keep writing: the kernel kills it when its
parent dies (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` (the process that started it) dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent kills its children on timeout only
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
