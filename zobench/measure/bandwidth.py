"""The machine's plain memory-copy bandwidth over given tensors: what a ZO pass over the same bytes could
reach (a pass reads and writes every value once; so does a copy)."""

from __future__ import annotations

import statistics
import time

import torch

CHUNK_BYTES = 16 << 20  # the destination: a 16 MiB buffer, refilled, so the copy costs no memory to speak of


def copy_gb_s(tensors: list[torch.Tensor], rounds: int = 3) -> float | None:
    """GB/s (bytes read + written) of copying every byte of ``tensors`` into a small reused buffer, the
    median of ``rounds``; None without bytes. CPU tensors only (a device copy is another question)."""
    flats = [t.detach().reshape(-1).view(torch.uint8) for t in tensors if t.device.type == "cpu" and t.numel()]
    total = sum(f.numel() for f in flats)
    if not total:
        return None
    buf = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for f in flats:
            for start in range(0, f.numel(), CHUNK_BYTES):
                part = f[start:start + CHUNK_BYTES]
                buf[:part.numel()].copy_(part)
        times.append(time.perf_counter() - t)
    return 2 * total / statistics.median(times) / 1e9
