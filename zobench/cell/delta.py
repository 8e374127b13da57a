"""What a fine-tuning run keeps: a small artifact, loaded anywhere a model is (``--delta DIR``).

    DIR/delta.json          what made it: format, zobench version, kind, the base model and a fingerprint
                            of its weights, the whole training config, the step it holds, its parent delta
    sparse      DIR/delta.safetensors   per trained tensor ``<name>::index`` (int32 flat indices) and
                                        ``<name>::value`` (float32 trained values): 0.1% of the scope
    trajectory  (in delta.json)         dense ZO (full, lezo): each step's [[seed, coefficient], ...]; loading
                                        replays the steps onto the base weights, bit for bit in float32
    lora        DIR/adapter/            a PEFT LoRA adapter directory (safetensors weights only)
    tensors     DIR/delta.safetensors   first-order full fine-tuning: the changed tensors

A delta is data someone may have handed over (docs/security.md): ``read`` checks every field before
anything uses it (``zobench.cell.delta_check``), and nothing in it can turn on remote code or name code to
import. Paths inside it (its parent, data and calibration folders, a local base model) are stored relative
to the delta's own folder and resolved against it, so a delta works from any working directory and
moves with its parent. A chain of deltas (trained from another delta) is applied root first, every link
checked, cycles and missing links refused; every link must name the same base weights (``base.fingerprint``).

``save`` never deletes what zobench did not write: the target must be new, empty or a complete delta (and
then only with an explicit overwrite), and the new delta replaces the old only once it is whole
(``zobench.outdirs``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

import zobench
from zobench.cell.delta_check import (
    FORMAT,
    KINDS,
    META,
    TENSORS,
    check_meta,
    checked_sparse,
    checked_tensors,
    resolve_paths,
)
from zobench.errors import UserError
from zobench.files import MAX_ARTIFACT_BYTES, read_json
from zobench.outdirs import claim_dir, replace_dir
from zobench.zo.mask_build import weights_fingerprint

__all__ = ["FORMAT", "KINDS", "META", "TENSORS", "base_fingerprint", "save", "read", "chain", "is_delta",
           "check_base", "sparse_parts", "write_sparse", "write_tensors", "claim_target"]

# Config keys that hold paths: stored relative to the delta's folder (see the module docstring).
PATH_KEYS = ("data_dir", "calib_path", "delta")


def base_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and the first values of every tensor."""
    return weights_fingerprint(list(model.named_parameters()))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def is_delta(path: Path) -> bool:
    """Whether ``path`` holds a complete delta (what ``claim_dir`` may let a new one replace)."""
    try:
        meta = read(path)
    except UserError:
        return False
    if meta["kind"] in ("sparse", "tensors"):
        return (path / TENSORS).is_file()
    if meta["kind"] == "lora":
        return (path / "adapter" / "adapter_config.json").is_file()
    return True


def claim_target(target: str | Path, overwrite: bool = False, name: str | None = None) -> Path:
    """Check before training that ``target`` may receive the delta (``zobench.outdirs.claim_dir``);
    ``name`` says where the path came from (``--save``) in a refusal."""
    return claim_dir(target, "zobench delta", is_delta, overwrite, flag="--overwrite", name=name)


def _portable(cfg: dict, target: Path) -> dict:
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


def save(target: Path, kind: str, cfg: dict, fingerprint: str, step: int, tensors: dict | None = None,
         extra: dict | None = None, adapter_model=None, overwrite: bool = False) -> dict:
    """Write the artifact to ``target`` and return its description (see the module docstring)."""
    target = claim_target(target, overwrite)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if tensors is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(stage / TENSORS))
        if adapter_model is not None:
            adapter_model.save_pretrained(str(stage / "adapter"), safe_serialization=True)
        extra = dict(extra or {})
        if extra.get("parent"):
            extra["parent"] = os.path.relpath(os.path.abspath(extra["parent"]), os.path.abspath(target))
        meta = {"format": FORMAT, "zobench": zobench.__version__, "kind": kind, "step": step,
                "base": {"model": _portable(cfg, target).get("model"), "fingerprint": fingerprint},
                "config": _portable(cfg, target), **extra}
        (stage / META).write_text(json.dumps(meta, indent=1, default=str, allow_nan=False) + "\n",
                                  encoding="utf-8")
        claim_target(target, overwrite)  # again: the folder may have changed while this one was trained
        replace_dir(stage, target)
    finally:
        if stage.exists():
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
    return {"path": str(target), "kind": kind, "step": step, "bytes": _dir_bytes(target)}


def read(path: str | Path) -> dict:
    """The artifact's ``delta.json``, checked, with its paths resolved against its folder; or one line
    saying why ``path`` is not a usable delta."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (a delta is the directory `--save` wrote)")
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


def check_base(meta: dict, path: Path, model: torch.nn.Module) -> None:
    got = base_fingerprint(model)
    if got != meta["base"]["fingerprint"]:
        raise UserError(f"{path}: this delta was trained from another base model ({meta['base']['model']}, weights "
                        f"{meta['base']['fingerprint']}); the model given has weights {got}")


def sparse_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(mask, values)``: flat indices and trained values per parameter name, checked for shape and
    finiteness (``checked_sparse``; ranges are checked against the model by ``write_sparse``)."""
    return checked_sparse(Path(path) / TENSORS)


@torch.no_grad()
def write_sparse(model: torch.nn.Module, mask: dict, values: dict, where: str = "delta") -> None:
    params = dict(model.named_parameters())
    for name, idx in mask.items():
        if name not in params:
            raise UserError(f"{where}: names a tensor '{name}' the model does not have")
        p = params[name]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
            raise UserError(f"{where}: '{name}' has indices outside its {p.numel():,} values")
        p.data.view(-1)[idx.to(p.device)] = values[name].to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def write_tensors(model: torch.nn.Module, path: Path) -> None:
    """A ``tensors`` delta (first-order fine-tuning): its saved tensors replace the model's."""
    params = dict(model.named_parameters())
    for name, value in checked_tensors(Path(path) / TENSORS, {n: tuple(p.shape) for n, p in params.items()}).items():
        params[name].copy_(value.to(params[name].dtype))
