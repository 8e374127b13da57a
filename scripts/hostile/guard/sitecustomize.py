"""A safety net loaded into every process a hostile case starts (it is put first on PYTHONPATH).

The code under test may delete the wrong directory (`--save /` was one of the bugs looked for). Every
Python-level deletion or rename whose victim lies outside the case's sandbox (and outside the few roots
zobench and Ray may legitimately clean: its model cache, Ray's temp dir, /dev/shm) is stopped here: the
path is written to HOSTILE_GUARD_LOG and the process ends at once with exit code 97. A dot-file that was
created after this process started (a temporary file or stage directory of zobench's own) and any
regular file created since then may be removed.

Active only when HOSTILE_SANDBOX is set; nothing here runs in ordinary use.
"""

import os
import shutil
import stat
import sys
import time

_SANDBOX = os.environ.get("HOSTILE_SANDBOX")

if _SANDBOX:
    _ROOTS = [os.path.realpath(p) for p in
              [_SANDBOX, *os.environ.get("HOSTILE_ALLOWED", "").split(os.pathsep)] if p]
    _STARTED = time.time() - 2
    _LOG = os.environ.get("HOSTILE_GUARD_LOG")
    _real = {"remove": os.remove, "unlink": os.unlink, "rmdir": os.rmdir, "rename": os.rename,
             "replace": os.replace, "rmtree": shutil.rmtree}

    def _where(path) -> str:
        path = os.path.abspath(os.fsdecode(os.fspath(path)))
        head, tail = os.path.split(path)
        return os.path.join(os.path.realpath(head), tail) if tail else os.path.realpath(path)

    def _inside(path: str) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in _ROOTS)

    def _fresh_dotfile(path: str) -> bool:
        """Made by this process tree: a file (any name) or a dot-named directory created since it started.
        (A directory's ctime moves whenever an entry is added, so only dot-named ones qualify.)"""
        try:
            st = os.lstat(path)
        except OSError:
            return True  # nothing there: nothing to lose
        if st.st_ctime < _STARTED:
            return False
        return not stat.S_ISDIR(st.st_mode) or os.path.basename(path).startswith(".")

    def _check(op: str, path, dir_fd=None) -> None:
        if dir_fd is not None or path is None:
            return  # inside an rmtree whose top was checked, or an fd-relative helper
        try:
            where = _where(path)
        except (TypeError, ValueError):
            return
        if _inside(where) or _fresh_dotfile(where):
            return
        try:
            if _LOG:
                with open(_LOG, "a", encoding="utf-8") as f:
                    f.write(f"{op} {where} (pid {os.getpid()})\n")
            sys.stderr.write(f"hostile-guard: blocked {op} of {where} outside the sandbox\n")
            sys.stderr.flush()
        finally:
            os._exit(97)

    def _one(name):
        real = _real[name]

        def wrapped(path, *args, dir_fd=None, **kw):
            _check(name, path, dir_fd)
            return real(path, *args, dir_fd=dir_fd, **kw) if dir_fd is not None else real(path, *args, **kw)
        return wrapped

    def _two(name):
        real = _real[name]

        def wrapped(src, dst, *args, **kw):
            if kw.get("src_dir_fd") is None:
                _check(name + " (source)", src)
            if kw.get("dst_dir_fd") is None and os.path.lexists(dst):
                _check(name + " (over)", dst)
            return real(src, dst, *args, **kw)
        return wrapped

    def _rmtree(path, *args, **kw):
        if kw.get("dir_fd") is None:
            _check("rmtree", path)
        return _real["rmtree"](path, *args, **kw)

    _rmtree.avoids_symlink_attacks = getattr(shutil.rmtree, "avoids_symlink_attacks", False)
    os.remove, os.unlink, os.rmdir = _one("remove"), _one("unlink"), _one("rmdir")
    os.rename, os.replace = _two("rename"), _two("replace")
    shutil.rmtree = _rmtree
