"""What a fine-tuning run keeps: a small artifact, loaded anywhere a model is (``--delta DIR``).

    DIR/delta.json          what made it: format, zobench version, kind, the base model and a fingerprint
                            of its weights, the whole training config, the step it holds, its parent delta
    sparse      DIR/delta.safetensors   per trained tensor ``<name>::index`` (int32 flat indices) and
                                        ``<name>::value`` (float32 trained values): 0.1% of the scope
    trajectory  (in delta.json)         dense ZO (full, lezo): each step's [[seed, coefficient], ...]; loading
                                        replays the steps onto the base weights, bit for bit in float32
    lora        DIR/adapter/            a PEFT LoRA adapter directory (safetensors weights only)
    tensors     DIR/delta.safetensors   first-order full fine-tuning: the changed tensors
    scales      DIR/delta.safetensors   QZO: ``<layer>::scales``, the trained quantization scales of each layer
                                        (float32; every one of them moves), applied after quantization, and
                                        ``scales_base`` (in delta.json), the identity of the scales it started from
    codes       DIR/delta.safetensors   quzo: per quantized layer ``<name>::index`` (int32 flat positions) and
                                        ``<name>::code`` (their new int8 / 4-bit codes), applied once the base
                                        is quantized as the delta's config says

A delta is data someone may have handed over (docs/security.md): ``read`` checks every field before
anything uses it (``zobench.cell.delta_check``), and nothing in it can turn on remote code or name code to
import. This module reads and describes deltas without torch (an influence suite's settings name one, and
``zobench run --dry-run`` reads them); writing, checking and applying the tensors is ``cell.delta_tensors``.
Paths inside it (its parent, data and calibration folders, a local base model) are stored relative
to the delta's own folder and resolved against it, so a delta works from any working directory and
moves with its parent. A chain of deltas (trained from another delta) is applied root first, every link
checked, cycles and missing links refused; every link must name the same base weights (``base.fingerprint``).

``save`` never deletes what zobench did not write: the target must be new, empty or a complete delta (and
then only with an explicit overwrite), and the new delta replaces the old only once it is whole
(``zobench.outdirs``).
"""

from __future__ import annotations

import os
from pathlib import Path

from zobench.cell.delta_check import FORMAT, KINDS, META, TENSORS, check_meta, resolve_paths
from zobench.errors import UserError
from zobench.files import MAX_ARTIFACT_BYTES, read_json
from zobench.outdirs import claim_dir

__all__ = ["FORMAT", "KINDS", "META", "TENSORS", "read", "chain", "is_delta", "claim_target", "portable",
           "dir_bytes"]

# Config keys that hold paths: stored relative to the delta's folder (see the module docstring).
PATH_KEYS = ("data_dir", "calib_path", "delta")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def is_delta(path: Path) -> bool:
    """Whether ``path`` holds a complete delta (what ``claim_dir`` may let a new one replace)."""
    try:
        meta = read(path)
    except UserError:
        return False
    if meta["kind"] in ("sparse", "tensors", "scales", "codes"):
        return (path / TENSORS).is_file()
    if meta["kind"] == "lora":
        return (path / "adapter" / "adapter_config.json").is_file()
    return True


def claim_target(target: str | Path, overwrite: bool = False, name: str | None = None) -> Path:
    """Check before training that ``target`` may receive the delta (``zobench.outdirs.claim_dir``);
    ``name`` says where the path came from (``--save``) in a refusal."""
    return claim_dir(target, "zobench delta", is_delta, overwrite, flag="--overwrite", name=name)


def portable(cfg: dict, target: Path) -> dict:
    """``cfg`` with relative local paths made relative to the delta's own folder (``target``)."""
    out = dict(cfg)
    keys = [k for k in PATH_KEYS if out.get(k)]
    model = out.get("model")
    if isinstance(model, str) and not model.startswith("random:") and os.path.exists(model):
        keys.append("model")  # a local checkpoint, not a hub id or a built-in name
    for key in keys:
        value = str(out[key])
        if not os.path.isabs(value):
            out[key] = os.path.relpath(os.path.abspath(value), os.path.abspath(target))
    return out


def read(path: str | Path) -> dict:
    """The artifact's ``delta.json``, checked, with its paths resolved against its folder; or one line
    saying why ``path`` is not a usable delta."""
    path = Path(path)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "not found"
        raise UserError(f"{path}: {what} (a delta is the directory `--save` wrote)")
    meta = read_json(path / META, "delta description", MAX_ARTIFACT_BYTES)
    meta = check_meta(meta, str(path / META))
    return resolve_paths(meta, path)


def chain(path: str | Path) -> list[tuple[Path, dict]]:
    """``(folder, meta)`` of the delta at ``path`` and all its ancestors, root first; refused in one line
    when a link is missing or broken, the chain has a cycle, or two links name different base weights."""
    links: list[tuple[Path, dict]] = []
    seen: set[Path] = set()
    at = Path(path)
    while True:
        real = at.resolve()
        if real in seen:
            raise UserError(f"{path}: its chain of parent deltas has a cycle (through {at})")
        seen.add(real)
        if not at.is_dir():
            child = links[-1][0] if links else path
            raise UserError(f"{child}: its parent delta {at} is gone; the trained model cannot be rebuilt without it")
        meta = read(at)
        if links and meta["base"]["fingerprint"] != links[-1][1]["base"]["fingerprint"]:
            raise UserError(f"{links[-1][0]}: its parent {at} was trained from other base weights "
                            f"({meta['base']['fingerprint']} against {links[-1][1]['base']['fingerprint']})")
        links.append((at, meta))
        if len(links) > 64:
            raise UserError(f"{path}: a chain of more than 64 parent deltas; zobench does not follow longer ones")
        if not meta.get("parent"):
            return links[::-1]
        at = Path(meta["parent"])
