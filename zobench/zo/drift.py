"""What a trainable's perturb-and-restore does to the weights, measured on the real code path."""

from __future__ import annotations

import torch

from zobench.zo.trainable import Trainable


@torch.no_grad()
def measure_restore_drift(trainable: Trainable, eps: float, seed: int = 12345,
                          probe_limit: int = 1 << 22) -> dict:
    """Run +eps, -2eps, +eps on the real code path and compare with the weights before.

    Compares up to ``probe_limit`` values (the first tensors in order) so the probe stays cheap on big
    models. Returns the fraction of probed values that changed and the largest absolute change.
    """
    params = trainable.params
    probe, n = [], 0
    for p in params:
        if n >= probe_limit:
            break
        probe.append((p, p.detach().clone()))
        n += p.numel()
    trainable.apply(seed, eps)
    trainable.apply(seed, -eps)
    trainable.restore()
    changed, max_abs, count = 0, 0.0, 0
    for p, before in probe:
        diff = (p.detach().float() - before.float()).abs()
        changed += int((diff > 0).sum())
        max_abs = max(max_abs, float(diff.max())) if diff.numel() else max_abs
        count += diff.numel()
    return {"restore_drift_frac_changed": changed / max(count, 1), "restore_drift_max_abs": max_abs,
            "restore_drift_probed": count}
