"""Helpers for tests that need the machine to refuse something for real: a full disk, a permission."""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path

import pytest


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
