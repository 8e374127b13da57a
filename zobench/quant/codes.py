"""The low-bit codes of bitsandbytes layers, read and written as a grid of levels with fixed scales.

    int8   (``Linear8bitLt``)  ``weight.data``: int8 codes [out, in] in [-127, 127]; a row's weight is
           code * SCB[row] / 127 (SCB: the row's absmax, float32). A uniform grid, one step per code.
    nf4/fp4 (``Linear4bit``)   ``weight.data``: two 4-bit codes a byte (the first value in the high nibble),
           blocks of ``blocksize`` values; a weight is code_table[code] * absmax[block]. The table (NF4's
           quantiles, FP4's values) is not uniform, and FP4 lists 0 twice (+0 and -0): ``levels`` are its
           distinct values in ascending order, and each code has its level's rank.

What a method may change is the codes; the scales (SCB, absmax and its double-quantization state) are never
written here. Values are addressed by their flat row-major index in the [out, in] weight, a chunk at a time,
so no layer is ever unpacked whole. Layers are recognised by their parameter's fields (``SCB``,
``quant_state``), so this module needs no bitsandbytes import; dequantizing a nested absmax goes through the
gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zobench.gates import bnb

INT8_MAX = 127


@dataclass
class CodeLayer:
    name: str                 # the module's name in the model
    module: torch.nn.Module
    kind: str                 # "int8" or "4bit"

    @property
    def weight(self):
        return self.module.weight

    @property
    def codes(self) -> torch.Tensor:
        """The tensor that stores the codes (what a snapshot of the trained state saves)."""
        return self.weight.data

    @property
    def shape(self) -> tuple[int, int]:
        return (self.module.out_features, self.module.in_features)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def code_range(self) -> tuple[int, int]:
        return (-INT8_MAX, INT8_MAX) if self.kind == "int8" else (0, 15)

    # -- the 4-bit table as a sorted grid -----------------------------------------------------------------
    def levels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(levels, rank, code)``: the table's distinct values ascending (float64), each code's rank in them,
        and one code for each rank (the first in the table)."""
        table = self.weight.quant_state.code.double().cpu()
        levels, rank = torch.unique(table, sorted=True, return_inverse=True)
        code = torch.full((levels.numel(),), -1, dtype=torch.long)
        for c in range(table.numel() - 1, -1, -1):
            code[rank[c]] = c
        device = self.codes.device
        return levels.to(device), rank.to(device), code.to(device)

    # -- values start .. stop of the flat [out, in] weight --------------------------------------------------
    def read(self, start: int, stop: int) -> torch.Tensor:
        """The codes of values ``start`` .. ``stop - 1`` (int64; 4-bit: ``start`` and ``stop`` even)."""
        flat = self.codes.view(-1)
        return decode(self.kind, flat[start:stop] if self.kind == "int8" else flat[start // 2:stop // 2])

    def write(self, start: int, stop: int, codes: torch.Tensor) -> None:
        """Store ``codes`` (int64, in ``code_range``) as values ``start`` .. ``stop - 1``."""
        flat = self.codes.view(-1)
        if self.kind == "int8":
            flat[start:stop] = codes.to(torch.int8)
        else:
            pairs = codes.view(-1, 2)
            flat[start // 2:stop // 2] = (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8)

    def put(self, index: torch.Tensor, codes: torch.Tensor) -> None:
        """Store ``codes`` (int64, in ``code_range``) at the flat positions ``index`` (int64, distinct, in
        range: the caller's checks). 4-bit: the high nibbles, then the low ones, so that two positions sharing
        a byte never race."""
        flat = self.codes.view(-1)
        index, codes = index.to(flat.device), codes.to(flat.device)
        if self.kind == "int8":
            flat[index] = codes.to(torch.int8)
            return
        for low in (0, 1):
            sel = index % 2 == low
            at, new = index[sel] // 2, codes[sel]
            byte = flat[at].long()
            flat[at] = ((byte & 0xF0) | new if low else (byte & 15) | (new << 4)).to(torch.uint8)

    def scale(self, start: int, stop: int) -> torch.Tensor:
        """The weight of one grid unit for each value (float64): SCB[row] / 127 (int8), absmax[block] (4-bit)."""
        idx = torch.arange(start, stop, device=self.codes.device)
        if self.kind == "int8":
            return row_scales(self.module)[idx // self.shape[1]].double() / INT8_MAX
        return block_absmax(self.weight.quant_state)[idx // self.weight.quant_state.blocksize].double()

    def scales_snapshot(self) -> torch.Tensor:
        """A copy of what the scales store (a test's check that nothing wrote them)."""
        if self.kind == "int8":
            return row_scales(self.module).clone()
        qs = self.weight.quant_state
        return torch.cat([qs.absmax.float().view(-1)] + ([qs.state2.absmax.float().view(-1)] if qs.nested else []))


def decode(kind: str, stored: torch.Tensor) -> torch.Tensor:
    """The codes (int64) that flat stored bytes hold: one an int8, two a 4-bit byte (high nibble first)."""
    if kind == "int8":
        return stored.long()
    packed = stored.long()
    return torch.stack([packed >> 4, packed & 15], 1).view(-1)


def row_scales(module: torch.nn.Module) -> torch.Tensor:
    """An int8 layer's row absmax: on its weight until its first forward, then in its state."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def block_absmax(qs) -> torch.Tensor:
    """A 4-bit layer's absmax per block (float32), itself quantized when nested (double quantization)."""
    if not qs.nested:
        return qs.absmax.float()
    return bnb.functional().dequantize_blockwise(qs.absmax, qs.state2).float() + qs.offset


def kind_of(module: torch.nn.Module) -> str | None:
    """"int8" or "4bit" for a bitsandbytes layer, else None."""
    w = getattr(module, "weight", None)
    if w is None:
        return None
    if w.dtype == torch.int8 and (hasattr(w, "SCB") or hasattr(module, "state")):
        return "int8"
    if w.dtype == torch.uint8 and getattr(w, "quant_state", None) is not None:
        return "4bit"
    return None


def code_layers(model: torch.nn.Module) -> list[CodeLayer]:
    """Every bitsandbytes layer of ``model``, in module order."""
    return [CodeLayer(name, m, kind) for name, m in model.named_modules() if (kind := kind_of(m)) is not None]
