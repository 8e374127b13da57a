"""Whether a run fits in this machine's memory before it starts: its estimated peak (``analysis.estimate``)
against what the machine has available (``measure.machine.available_memory_mib``). ``zobench run`` records a
cell that does not fit as unsupported instead of starting it (``executors.local``); ``zobench train`` and
``eval`` refuse such a run in one line (``api.train``)."""

from __future__ import annotations

import torch

from zobench.analysis.estimate import device_of, record_estimate


def host_need_mib(config, est: dict | None = None) -> float | None:
    """The estimated peak in this machine's memory of a cell of ``config``: a CPU cell's peak RSS, a GPU
    cell's host side (its largest host phase); None without an estimate, and for a GPU cell on a machine
    without one (it ends at once as unsupported, saying that). ``est``: the cell's estimate where the caller
    has it already (``estimate_cell``'s or ``record_estimate``'s), else it is made here."""
    try:
        if device_of(config) == "cuda" and not torch.cuda.is_available():
            return None
    except Exception:  # an unknown device: the cell's own validation says so
        return None
    est = record_estimate(config) if est is None else est
    host = est.get("host_phases") or {}
    return max(host.values()) if host else est.get("peak_mib")


def memory_refusal(need: float | None, available: tuple[float, str] | None,
                   anyway: str = "zobench run --no-memory-check") -> str | None:
    """Why a cell needing ``need`` MiB is not started now, or None: more than ``available``
    (``available_memory_mib``: MiB, source). Started anyway, such a cell would be killed for memory after
    its load (or push the machine into swap); without an estimate or a reading, it starts."""
    if need is None or available is None or need <= available[0]:
        return None
    return (f"not started: its estimated peak, {need:,.0f} MiB of this machine's memory, is more than the "
            f"{available[0]:,.0f} MiB available ({available[1]}); free memory or run it on a larger machine "
            f"(`{anyway}` starts it anyway)")
