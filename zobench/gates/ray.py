"""Gate: Ray (``zobench[ray]``), imported when a suite or an influence cache runs on Ray.

Importing, joining or starting an instance, and reading the cluster's nodes: what the Ray executor
(``executors.ray_executor``) and the Ray cache builder (``influence.ray_cache``) share, so neither imports
the other. Without the package, one line says how to install it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import sys
import tempfile
from pathlib import Path

from zobench.errors import UserError

OBJECT_STORE_MIB = 256  # the private instance's object store: records and sketch rows, never weights


def load():
    """The ray package (usage statistics off), or one line saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'zobench[ray]' (scripts/setup.sh installs it)") \
            from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None):
    """Ray, initialised: an existing connection is reused (tests start one per session); ``address`` joins a
    cluster; otherwise a private local instance. Returns ``(ray, started_here)``."""
    ray = load()
    if ray.is_initialized():
        return ray, False
    common = dict(include_dashboard=False, log_to_driver=False, logging_level="warning")
    if address:
        reachable(address)
        with quiet_stderr() as said, own_sigterm():
            try:
                ray.init(address=address, **common)
            except Exception as e:  # ConnectionError, a bad address, a version mismatch: one line, exit 2
                first = (str(e).splitlines() or said() or [""])[0][:200]
                raise UserError(f"--address {address}: cannot join the Ray cluster ({type(e).__name__}: "
                                f"{first})") from None
        return ray, True
    # A private instance. Ray's ports listen on every interface even with the node address set to
    # 127.0.0.1, so token authentication stays on; the token is made here, for this run only, and lives in
    # this process tree's environment (cells never see it), not in a file under the user's home.
    # (Ray turns token mode on for a new local instance itself; it only needs a token it finds.)
    wants_token = os.environ.get("RAY_AUTH_MODE", "token") == "token"
    if wants_token and not ({"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ)):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Workers (and the cells they start) import this same zobench, wherever it was imported from here.
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    with own_sigterm():
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=OBJECT_STORE_MIB * 2**20,
                 _node_ip_address="127.0.0.1", _system_config={"task_oom_retries": 0}, **common)
    return ray, True


CONNECT_TIMEOUT_S = 10.0


@contextlib.contextmanager
def quiet_stderr():
    """Hold what Ray's C++ core writes to the process's stderr while joining a cluster (a failed join logs
    20 lines of gRPC retries there, past Python's sys.stderr); it is shown only if the join succeeds and
    there was something worth keeping, and a failure is then reported in one line. Yields a function that
    returns the lines held so far."""
    held = tempfile.TemporaryFile()
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(held.fileno(), 2)
    lines = []

    def said() -> list[str]:
        held.seek(0)
        lines[:] = held.read().decode("utf-8", "replace").splitlines()
        return lines

    try:
        yield said
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        held.close()


@contextlib.contextmanager
def own_sigterm():
    """Ray's init installs a SIGTERM handler that exits with code 15; zobench's (stop like Ctrl-C: exit
    130, running cells killed) is put back, and a SIGTERM during the join itself counts as an interrupt."""
    mine = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as e:
        if e.code == signal.SIGTERM:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGTERM, mine)


def reachable(address: str) -> None:
    """Refuse in one line, within ``CONNECT_TIMEOUT_S``, a cluster address nobody answers at (Ray's own
    connect retries for minutes and cannot be interrupted meanwhile). ``auto`` and names without a port
    are left to Ray, which answers those at once."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"--address {address}: nothing answers there ({e.strerror or type(e).__name__}, "
                        f"waited up to {CONNECT_TIMEOUT_S:.0f} s); is the Ray cluster running?") from None




def nodes(ray) -> list[dict]:
    """The alive nodes' resources: [{"id", "cpus", "gpus", "memory"}]."""
    out = []
    for n in ray.nodes():
        if n.get("Alive"):
            r = n.get("Resources", {})
            out.append({"id": n["NodeID"], "cpus": int(r.get("CPU", 0)), "gpus": int(r.get("GPU", 0)),
                        "memory": int(r.get("memory", 0))})
    if not out:
        raise UserError("the Ray cluster has no alive node")
    return out
