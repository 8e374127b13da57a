"""A pretrained checkpoint read tensor by tensor from its safetensors shards: the float model is never whole.

``open_streamed`` builds the architecture on the meta device and reads from the shards every tensor but the
block linears, each cast to the cell's dtype as ``from_pretrained`` casts it; the block linears wait on the
meta device until ``FromShards`` reads one (the quantize phase quantizes it before reading the next; a
sensitive mask reads each block twice: ``models.layerwise``). The values are the checkpoint's own, so the
model equals the one ``from_pretrained`` loads, tensor for tensor (tests/test_layerwise.py).

Only a checkpoint whose tensor names are the model's parameter names (Llama-style checkpoints saved by
transformers) streams; any other (renamed keys, weights in another format, buffers of its own) returns
None and is loaded whole with ``from_pretrained``, as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from zobench.models.stream import Deferred, foreign_buffers

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def tensor_files(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> the shard that holds it, or None (no safetensors, or an index that is not one)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(weight_map, dict):
            return None
        files = {str(k): folder / str(v) for k, v in weight_map.items()}
        if any(f.parent != folder or not f.is_file() for f in files.values()):
            return None  # a shard outside the folder, or missing
        return files
    if (folder / SINGLE).is_file():
        try:
            with safe_open(str(folder / SINGLE), "pt") as f:
                return {k: folder / SINGLE for k in f.keys()}
        except (OSError, SafetensorError):  # not a safetensors file: from_pretrained says so in one line
            return None
    return None


def _read(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name)


class FromShards(Deferred):
    """Deferred linears of a pretrained checkpoint: each read from its shard and cast to its meta dtype."""

    def __init__(self, names: list[str], device, files: dict[str, Path]):
        super().__init__(names, device)
        self.files = files

    def make(self, module, attr, pname) -> None:
        meta = module._parameters[attr]
        t = _read(self.files[pname], pname).to(device=self.device, dtype=meta.dtype)
        module._parameters[attr] = nn.Parameter(t, requires_grad=meta.requires_grad)

    def head(self, model, pname, n=1024) -> torch.Tensor:
        meta = model.get_parameter(pname)
        with safe_open(str(self.files[pname]), "pt") as f:
            part = f.get_slice(pname)
            cols = max(1, meta.numel() // max(meta.shape[0], 1)) if meta.dim() else 1
            rows = part[: -(-n // cols)] if meta.dim() else part[:]
        return rows.reshape(-1)[:n].to(device=self.device, dtype=meta.dtype)


def open_streamed(folder: Path, model: nn.Module, device, defer: list[str]) -> FromShards | None:
    """Fill the meta-device ``model`` from the checkpoint in ``folder`` but the linears named in ``defer``
    (returned as a ``FromShards``); None, touching nothing, where the checkpoint cannot stream (module
    docstring). Tied parameters stay tied."""
    files = tensor_files(folder)
    if files is None:
        return None
    params = dict(model.named_parameters())  # tied ones once, under their first name
    if any(name not in files for name in params):
        return None
    if any(foreign_buffers(module) for module in model.modules()):
        return None
    deferred = FromShards(list(defer), device, files)
    deferred.fill(model)
    return deferred
