"""What this machine and zobench's checkout are, read without torch: the CPU's name, installed package
versions, the git commit and whether the code differs from it. ``zobench run`` asks for the git state
before it starts anything (a suite that declares claims refuses a dirty tree), so this stays light."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path


def package_version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU instruction sets that decide which kernels run (torch's matmuls, bitsandbytes' 4-bit path, the ZO pass
# built with -march=native): the same code is another computation on another CPU.
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_flags() -> list[str]:
    """The ``KERNEL_FLAGS`` this CPU has (from /proc/cpuinfo; [] where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in KERNEL_FLAGS if f in have]
    except OSError:
        pass
    return []


def machine_name(env) -> str:
    """A machine in a few words, from an environment mapping (a record's ``env``, or this process's): its GPU
    model (with the count where several) and its CPU model with its cores; '' when it names neither. One
    line of at most 160 characters (a record is data)."""
    if not isinstance(env, dict):
        return ""
    parts = []
    if env.get("gpu"):
        count = env.get("gpu_count")
        parts.append(f"GPU {env['gpu']}" + (f" x{count}" if type(count) is int and count > 1 else ""))
    if env.get("cpu"):
        parts.append(f"{env['cpu']} ({env.get('cpu_count', '?')} cores)")
    return " ".join(", ".join(str(p) for p in parts).split())[:160]


# Where zobench's own code lives: the checkout whose state a record names (never the folder of a suite or
# data file: a repository there is someone else's, and its configuration can run commands).
SOURCE = Path(__file__).resolve().parents[2]
# What does not count as "the code changed" (issue: records were "dirty" only because the results file
# being appended was tracked): measurements and their renderings.
NOT_CODE = ("results", "reports")
# Settings that make git run a configured command; they are switched off for every call (the checkout is
# zobench's own, but its .git/config is not something a record should ever execute).
SAFE_GIT = ("-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null", "-c", "core.untrackedCache=false",
            "-c", "diff.external=", "--no-optional-locks")


def git_state(source: str | Path | None = None) -> dict:
    """Commit of zobench's own checkout and whether its code differs from that commit (``dirty``; changes
    under results/ and reports/ do not count), or {} when zobench does not run from a git checkout.

    git only lists here (``rev-parse``, ``ls-tree``, ``ls-files``: none of them reads a working file): the
    working files are hashed as git hashes blobs and compared with the commit's. ``git status`` would do the
    comparison itself, but it runs a checkout's clean filters (``.gitattributes`` + ``filter.*.clean``) on
    any file whose timestamps changed, and no switch turns those off. A file the commit has and the tree
    lacks, or whose bytes, executable bit or link target differ, is a change; so is a file in the index that
    the commit lacks (added, not committed). Untracked files are not. A checkout that converts line endings
    on checkout reads as changed: the comparison is of bytes, and errs towards "dirty"."""
    root = Path(source) if source is not None else SOURCE
    if not (root / ".git").exists():  # an installed package, or a plain copy of the source
        return {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0")

    def git(*args):
        return subprocess.run(["git", *SAFE_GIT, *args], cwd=root, capture_output=True, timeout=10, env=env,
                              stdin=subprocess.DEVNULL)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        commit = head.stdout.decode().strip()
        tree, index = git("ls-tree", "-r", "-z", "--full-tree", "HEAD"), git("ls-files", "-z")
        if tree.returncode != 0 or index.returncode != 0:
            return {"commit": commit}
        committed = {}
        for entry in tree.stdout.split(b"\0"):
            if entry:
                meta, path = entry.split(b"\t", 1)
                mode, _, sha = meta.split(b" ")
                committed[os.fsdecode(path)] = (mode.decode(), sha.decode())
        dirty = any(path not in committed and _is_code(path)
                    for path in (os.fsdecode(p) for p in index.stdout.split(b"\0") if p))
        dirty = dirty or any(_is_code(path) and _differs(root / path, mode, sha)
                             for path, (mode, sha) in committed.items())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def _is_code(path: str) -> bool:
    return path.split("/", 1)[0] not in NOT_CODE


def _differs(path: Path, mode: str, sha: str) -> bool:
    """Whether a working file differs from the committed blob ``sha`` of ``mode`` (a submodule: never)."""
    if mode == "160000":
        return False
    try:
        if mode == "120000":
            data = os.fsencode(os.readlink(path)) if path.is_symlink() else None
        elif path.is_symlink() or not path.is_file():
            return True
        else:
            data = path.read_bytes()
            if (mode == "100755") != os.access(path, os.X_OK):
                return True
    except OSError:
        return True
    if data is None:
        return True
    h = hashlib.sha256() if len(sha) == 64 else hashlib.sha1()  # the repository's object format
    h.update(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest() != sha


def available_memory_mib(meminfo: str | Path = "/proc/meminfo",
                         cgroup: str | Path = "/sys/fs/cgroup") -> tuple[float, str] | None:
    """The memory a new process could take now (MiB) and where the figure comes from: the kernel's
    ``MemAvailable``, or what is left under this process's cgroup limit (v2 ``memory.max`` less
    ``memory.current``; v1 ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``) where that is less.
    None where neither can be read (not Linux)."""
    found: list[tuple[float, str]] = []
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) / 1024, "MemAvailable"))
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                           "memory/memory.usage_in_bytes")):
        try:
            cap = (Path(cgroup) / limit).read_text().strip()
            if cap == "max" or int(cap) >= 2**60:  # no limit (v1 writes a huge number)
                continue
            left = (int(cap) - int((Path(cgroup) / usage).read_text().strip())) / 2**20
            found.append((max(left, 0.0), f"cgroup limit {int(cap) / 2**20:,.0f} MiB"))
        except (OSError, ValueError):
            continue
    return min(found) if found else None
