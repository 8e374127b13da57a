"""Build zo_pass.c into a shared library once per machine, cached for every later process.

Plain gcc and ctypes, no torch headers: it builds in about a second, and loading it costs next to
nothing (torch's C++ extension toolchain would add ~41 MiB of RSS to every cell, against its budget).

-march=native: the library is built on, and only for, the machine that runs it. Its file name is keyed by
the CPU's feature flags (with the source, the compiler and the flags), so a cache shared between machines
(an NFS home, a Ray cluster) holds one build per kind of CPU, never one CPU's build run on another. It
changes no result: -ffp-contract=off keeps every rounding where the source puts it (vector and scalar
code round each float operation alike), and the one fmaf is exact on every target. -fno-math-errno only
lets sqrt be one instruction; -fno-trapping-math only lets floor and the float-to-integer conversions of
QuZO's int8 pass vectorise (no code here reads the floating-point exception flags; the values are the
same: tests/test_quzo.py holds them to the torch path bit for bit); -ffast-math is never used (it would
reorder the sums).

``python -m zobench.zo.kernels.build`` builds it ahead of time (scripts/setup.sh) and prints where.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from zobench.files import cache_dir
from zobench.outdirs import build_lock

SOURCE = Path(__file__).with_name("zo_pass.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC",
         "-shared", "-std=gnu11")


class BuildError(RuntimeError):
    """Why the library cannot be had: the reason the torch fallback runs, worth a line in a record."""


def compiler() -> str:
    return os.environ.get("CC") or "gcc"


def cpu_signature() -> str:
    """The CPU's feature flags: what -march=native compiles for."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, arm
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def library_path(root: str | Path | None = None, flags: tuple[str, ...] = FLAGS) -> Path:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), compiler().encode(), cpu_signature().encode()):
        digest.update(part)
        digest.update(b"\0")
    return Path(root or cache_dir()) / "kernels" / f"zo_pass-{digest.hexdigest()[:16]}.so"


def build(root: str | Path | None = None, flags: tuple[str, ...] = FLAGS) -> Path:
    """The library's path, compiled first if this machine has none yet (one builder at a time). Other
    ``flags``: a build of its own beside it (the test that -march=native changes no result)."""
    target = library_path(root, flags)
    if target.exists():
        return target
    cc = shutil.which(compiler())
    if cc is None:
        raise BuildError(f"no C compiler ({compiler()} not found on PATH)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"{target.parent}: cannot create the kernel cache: {e.strerror or e}") from None
    with build_lock(target):
        if target.exists():  # another process built it while this one waited
            return target
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".so")
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode != 0:
                lines = (proc.stderr or proc.stdout).strip().splitlines()
                raise BuildError(f"{compiler()} failed (exit {proc.returncode}): {lines[-1] if lines else ''}")
            os.replace(tmp, target)  # whole or absent: a process that loads it never sees half a file
        except (OSError, subprocess.SubprocessError) as e:
            raise BuildError(f"{compiler()} could not build {SOURCE.name}: {e}") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target


def load(root: str | Path | None = None, flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL:
    path = build(root, flags)
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise BuildError(f"{path}: cannot be loaded: {e}") from None


def main() -> int:
    try:
        lib = build()
        load()
    except BuildError as e:
        print(f"zobench: the ZO kernel was not built ({e}); the torch fallback will run", file=sys.stderr)
        return 1
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
