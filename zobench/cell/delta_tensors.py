"""The tensors of deltas (``zobench.cell.delta``): written, checked before use, and applied to a model.

A delta's tensors are data from someone else too (docs/security.md): names must be ``<param>::index`` /
``<param>::value`` pairs (sparse) or the model's own parameter names (tensors), indices 1-D integers,
unique and non-negative, values finite, shapes the model's; a ``scales`` delta's names are quantized layers of
the model, each with as many finite scales as the layer has.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import zobench
from zobench.cell.delta import FORMAT, META, TENSORS, claim_target, dir_bytes, portable
from zobench.errors import UserError
from zobench.files import temp_dir
from zobench.fingerprint import scales_fingerprint, weights_fingerprint
from zobench.outdirs import replace_dir
from zobench.quant.codes import code_layers

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def base_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and the first values of every tensor."""
    return weights_fingerprint(list(model.named_parameters()))


def save(target: Path, kind: str, cfg: dict, fingerprint: str, step: int, tensors: dict | None = None,
         extra: dict | None = None, adapter_model=None, overwrite: bool = False) -> dict:
    """Write the artifact to ``target`` and return its description (see the module docstring)."""
    target = claim_target(target, overwrite)
    stage = temp_dir(target.parent, f".{target.name}.")
    try:
        if tensors is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(stage / TENSORS))
        if adapter_model is not None:
            adapter_model.save_pretrained(str(stage / "adapter"), safe_serialization=True)
        extra = dict(extra or {})
        if extra.get("parent"):
            extra["parent"] = os.path.relpath(os.path.abspath(extra["parent"]), os.path.abspath(target))
        meta = {"format": FORMAT, "zobench": zobench.__version__, "kind": kind, "step": step,
                "base": {"model": portable(cfg, target).get("model"), "fingerprint": fingerprint},
                "config": portable(cfg, target), **extra}
        (stage / META).write_text(json.dumps(meta, indent=1, default=str, allow_nan=False) + "\n",
                                  encoding="utf-8")
        claim_target(target, overwrite)  # again: the folder may have changed while this one was trained
        replace_dir(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return {"path": str(target), "kind": kind, "step": step, "bytes": dir_bytes(target)}


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
        v = values[name].to(device=p.device, dtype=p.dtype)
        if v.device.type != "meta":  # finite as stored, yet past fp16's range (a meta weight takes nothing)
            _finite(name, v, Path(where), f" in the model's {p.dtype}")
        p.data.view(-1)[idx.to(p.device)] = v


@torch.no_grad()
def write_tensors(model: torch.nn.Module, path: Path) -> None:
    """A ``tensors`` delta (first-order fine-tuning): its saved tensors replace the model's."""
    params = dict(model.named_parameters())
    for name, value in checked_tensors(Path(path) / TENSORS, {n: tuple(p.shape) for n, p in params.items()}).items():
        v = value.to(params[name].dtype)
        _finite(name, v, Path(path) / TENSORS, f" in the model's {v.dtype}")
        params[name].copy_(v)


@torch.no_grad()
def write_scales(path: Path, meta: dict, current: dict[str, torch.Tensor]) -> None:
    """A ``scales`` delta (QZO) onto the quantized model, whose plain scales are ``current`` (layer name ->
    the tensor its forward reads), after checking that they are the scales it was trained from."""
    data = checked_scales(Path(path) / TENSORS, current)
    got = scales_fingerprint([(name, current[name]) for name in data])
    if got != meta["scales_base"]:
        raise UserError(f"{path}: its scales were trained beside other quantized codes (scales {meta['scales_base']}, "
                        f"here {got}); load it on the same base, quantized as it was trained")
    for name, t in data.items():
        v = t.to(current[name].dtype)
        _finite(name, v, Path(path) / TENSORS, f" in the layer's {v.dtype}")
        if bool((v < 0).any()):  # QZO keeps its scales >= 0: a negative one flips its whole block's signs
            raise UserError(f"{Path(path) / TENSORS}: '{name}' holds negative scales; QZO's are never below 0")
        current[name].copy_(v)


def _open(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or one line when it is missing or not a safetensors file."""
    if not file.is_file():
        raise UserError(f"{file}: missing (the delta's tensors)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None


def _finite(name: str, t: torch.Tensor, file: Path, as_what: str = "") -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise UserError(f"{file}: '{name}' has dtype {t.dtype}, expected floating-point values")
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{file}: '{name}' holds values that are not finite{as_what} (NaN or infinite)")


def check_adapter_weights(adapter: str | Path) -> None:
    """A LoRA adapter's weights, before peft loads them (its config is ``delta_check.check_adapter``'s): at
    least one tensor (peft only warns of missing keys, and the base model would be evaluated as if trained),
    each finite floating-point values, as a sparse delta's must be."""
    file = Path(adapter) / "adapter_model.safetensors"
    weights = _open(file)
    if not weights:
        raise UserError(f"{file}: holds no tensors; an adapter without weights is the base model")
    for name, t in weights.items():
        _finite(name, t, file)


def checked_sparse(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(mask, values)`` of a sparse delta: per tensor name, int64 flat indices (unique, >= 0) and finite
    float values of the same length."""
    mask, values = {}, {}
    for key, name, part, t in _entries(file, "value"):
        if part == "index":
            mask[name] = _indices(key, t, file)
        else:
            _finite(key, t, file)
            values[name] = t
    _paired(mask, values, "values", file)
    return mask, values


def _entries(file: Path, second: str):
    """``(key, name, part, tensor)`` of every tensor of ``file``: each a flat vector named
    ``<param>::index`` or ``<param>::<second>``."""
    for key, t in _open(file).items():
        name, _, part = key.rpartition("::")
        if part not in ("index", second) or not name:
            raise UserError(f"{file}: tensor '{key}' is not a '<param>::index' or '<param>::{second}' entry")
        if t.dim() != 1:
            raise UserError(f"{file}: '{key}' has shape {tuple(t.shape)}, expected a flat vector")
        yield key, name, part, t


def _indices(key: str, t: torch.Tensor, file: Path) -> torch.Tensor:
    """A delta's flat positions (int64): 1-D integers, non-negative, none twice."""
    if t.dtype not in INDEX_DTYPES:
        raise UserError(f"{file}: '{key}' has dtype {t.dtype}, expected int32 or int64 indices")
    idx = t.long()
    if idx.numel() and int(idx.min()) < 0:
        raise UserError(f"{file}: '{key}' holds negative indices")
    if int(idx.unique().numel()) != idx.numel():
        raise UserError(f"{file}: '{key}' names an entry twice")
    return idx


def _paired(mask: dict, values: dict, what: str, file: Path) -> None:
    """Every tensor name has both its indices and its ``what``, of the same length."""
    for name in set(mask) | set(values):
        if name not in mask or name not in values:
            raise UserError(f"{file}: '{name}' has {what if name in values else 'indices'} but no "
                            f"{'indices' if name in values else what}")
        if mask[name].numel() != values[name].numel():
            raise UserError(f"{file}: '{name}' has {mask[name].numel()} indices and {values[name].numel()} {what}")


def checked_codes(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(positions, codes)`` of a codes delta (quzo): per quantized weight, int64 flat positions (unique,
    >= 0) and as many int8 / uint8 codes (ranges are checked against the model's layers by ``write_codes``)."""
    positions, codes = {}, {}
    for key, name, part, t in _entries(file, "code"):
        if part == "index":
            positions[name] = _indices(key, t, file)
        elif t.dtype not in (torch.int8, torch.uint8):
            raise UserError(f"{file}: '{key}' has dtype {t.dtype}, expected int8 or uint8 codes")
        else:
            codes[name] = t
    _paired(positions, codes, "codes", file)
    return positions, codes


@torch.no_grad()
def write_codes(model: torch.nn.Module, path: Path) -> None:
    """A ``codes`` delta's codes into the quantized layers of ``model``: each name a layer's weight, each
    position inside it, each code in the layer's range and of its kind's dtype."""
    file = Path(path) / TENSORS
    positions, codes = checked_codes(file)
    layers = {f"{layer.name}.weight": layer for layer in code_layers(model)}
    for name, idx in positions.items():
        layer = layers.get(name)
        if layer is None:
            raise UserError(f"{file}: names '{name}', which is not a quantized (int8 / 4-bit) weight of the model")
        dtype = torch.int8 if layer.kind == "int8" else torch.uint8
        if codes[name].dtype != dtype:
            raise UserError(f"{file}: '{name}::code' has dtype {codes[name].dtype}; the layer's codes are {dtype}")
        if idx.numel() and int(idx.max()) >= layer.numel:
            raise UserError(f"{file}: '{name}' has positions outside its {layer.numel:,} values")
        low, high = layer.code_range
        new = codes[name].long()
        if new.numel() and (int(new.min()) < low or int(new.max()) > high):
            raise UserError(f"{file}: '{name}::code' holds codes outside [{low}, {high}]")
        layer.put(idx, new)


def checked_tensors(file: Path, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """A ``tensors`` delta's tensors: each one names a parameter of the model (``shapes``) and has its
    shape and finite float values."""
    data = _open(file)
    for name, t in data.items():
        if name not in shapes:
            raise UserError(f"{file}: names a tensor '{name}' the model does not have")
        if tuple(t.shape) != shapes[name]:
            raise UserError(f"{file}: '{name}' has shape {tuple(t.shape)}, the model's is {shapes[name]}")
        _finite(name, t, file)
    return data


def checked_scales(file: Path, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``scales`` delta's tensors: each names a quantized layer of the model (``current``: its scales) and
    holds a flat vector of as many finite float values."""
    data = _open(file)
    for name, t in data.items():
        if name not in current:
            raise UserError(f"{file}: names a layer '{name}' that has no plain quantization scales in this model")
        if t.dim() != 1 or t.numel() != current[name].numel():
            raise UserError(f"{file}: '{name}' has shape {tuple(t.shape)}, the layer has {current[name].numel()} "
                            f"scales")
        _finite(name, t, file)
    return data
