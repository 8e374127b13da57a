"""What a trainable's perturb-and-restore does to the weights, measured on the real code path."""

from __future__ import annotations

import torch

from zobench.zo.trainable import Trainable


def _changed(now: torch.Tensor, before: torch.Tensor) -> tuple[int, int]:
    """(values that differ, values compared). A uint8 trainable is packed 4-bit codes, two a byte
    (bitsandbytes' ``Params4bit``, QuZO's trainable): each half of a byte is a value of its own."""
    if now.dtype == torch.uint8:
        diff = now ^ before
        return int(((diff & 0x0F) != 0).sum()) + int(((diff & 0xF0) != 0).sum()), 2 * now.numel()
    return int((now != before).sum()), now.numel()


@torch.no_grad()
def measure_restore_drift(trainable: Trainable, eps: float, seed: int = 12345,
                          probe_limit: int = 1 << 22) -> dict:
    """Run +eps, -2eps, +eps on the real code path and compare with the weights before.

    Compares up to ``probe_limit`` values (the first tensors in order) so the probe stays cheap on big
    models. Returns the fraction of probed values that changed and the largest absolute change, and the
    fraction that the +eps perturbation changed at all (``perturb_frac_changed``): below 1 where eps is under
    the values' resolution, as for bfloat16 weights of magnitude 0.5 and above at eps 1e-3 (their spacing,
    2^-8, is over 2 eps), or for quantized codes, which a stochastic rounding moves one level with
    probability eps over the level's gap.
    """
    params = trainable.params
    # a sparse trainable's selected positions in each tensor (None: every value is trainable)
    indices = getattr(trainable, "indices", None) or [None] * len(params)
    probe, n = [], 0
    for p, i in zip(params, indices):
        if n >= probe_limit:
            break
        probe.append((p, i, p.detach().clone()))
        n += p.numel()
    trainable.apply(seed, eps)
    moved = [_changed(p.detach(), before) if i is None else _changed(p.detach().view(-1)[i], before.view(-1)[i])
             for p, i, before in probe]
    trainable.apply(seed, -eps)
    trainable.restore()
    changed, max_abs, count = 0, 0.0, 0
    for p, _, before in probe:
        diff = (p.detach().float() - before.float()).abs()
        changed += int((diff > 0).sum())
        max_abs = max(max_abs, float(diff.max())) if diff.numel() else max_abs
        count += diff.numel()
    perturbed = sum(m for m, _ in moved) / max(sum(c for _, c in moved), 1)
    return {"restore_drift_frac_changed": changed / max(count, 1), "restore_drift_max_abs": max_abs,
            "restore_drift_probed": count, "perturb_frac_changed": perturbed}
