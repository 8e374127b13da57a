"""The dense-and-sparse layer: a quantized dense part plus a few trainable 16/32-bit values.

Quantized weights cannot be perturbed by eps * z in place: a 4-bit code moves in steps far larger than
eps. SensZOQ (arXiv 2406.02913) therefore splits each weight W into

    W = D + S,   D = W with the selected entries zeroed, then quantized;   S = the selected entries only,

keeps S's values in the model's dtype, and computes ``y = D(x) + x @ S^T``. ZO perturbs and updates only
S's values, so the sparse ZO machinery (``SparseTrainable``) runs unchanged on them.

``x @ S^T`` never builds a dense [out, in] matrix, and is added straight into the quantized layer's
output: for each chunk of tokens, gather the input columns of the selected entries, multiply by their
values, and ``index_add_`` into the output columns (a [tokens, nnz] temporary, bounded by GATHER_LIMIT).
Measured side by side on SmolLM2's layer shapes (``bench/sparse_delta.py``), this was faster than torch's
CSR product on the CPU, and it needs no [tokens, out] delta tensor at all.
"""

from __future__ import annotations

import torch

GATHER_LIMIT = 1 << 22  # values in the gather path's [rows, nnz] temporary (16 MiB of float32)


def _by_input(flat: torch.Tensor, in_features: int, out_features: int):
    """Row-major flat indices into [out, in] -> (order, rows, cols) sorted by input column, then row:
    the gather then reads the input's columns in order."""
    rows, cols = flat // in_features, flat % in_features
    order = torch.argsort(cols * out_features + rows)
    # int32: half the bytes of int64; index_add_ and indexing take them as they are.
    return order, rows[order].int(), cols[order].int()


class SparseDelta(torch.nn.Module):
    """``base(x) + x @ S^T``; ``values`` (a buffer in the compute dtype) are what ZO perturbs."""

    def __init__(self, base: torch.nn.Module, flat_index: torch.Tensor, values: torch.Tensor,
                 in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.base, self.in_features, self.out_features = base, in_features, out_features
        order, rows, cols = _by_input(flat_index.to(values.device), in_features, out_features)
        self.register_buffer("values", values[order].to(dtype).contiguous())
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def flat_index(self) -> torch.Tensor:
        """The selected entries as row-major indices into [out, in], in the order of ``values``."""
        return self.rows.long() * self.in_features + self.cols.long()

    def add_product(self, y2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """``y2 += x2 @ S^T`` in place ([n, out] and [n, in]), in chunks of rows; returns ``y2``."""
        values = self.values if self.values.dtype == x2.dtype else self.values.to(x2.dtype)
        step = max(1, GATHER_LIMIT // max(self.nnz, 1))
        for i in range(0, x2.shape[0], step):
            part = x2[i:i + step].index_select(1, self.cols).mul_(values)
            y2[i:i + step].index_add_(1, self.rows, part.to(y2.dtype))
        return y2

    def sparse_product(self, x2: torch.Tensor) -> torch.Tensor:
        """[n, in] -> [n, out]: ``x2 @ S^T`` without a dense S."""
        return self.add_product(x2.new_zeros(x2.shape[0], self.out_features), x2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.nnz == 0:
            return y
        y = y.contiguous()
        # In place into the layer's fresh output (ZO runs without autograd): no [tokens, out] delta.
        self.add_product(y.view(-1, self.out_features), x.reshape(-1, self.in_features))
        return y


@torch.no_grad()
def split_selected(model: torch.nn.Module, mask: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Take the selected entries out of each masked weight (zeroing them there), before quantization.

    Returns ``{module name: (flat indices, values)}``; the weights left behind are the dense parts.
    """
    taken = {}
    for pname, idx in mask.items():
        if idx.numel() == 0:
            continue
        mname = pname.removesuffix(".weight")
        weight = model.get_submodule(mname).weight
        flat = weight.data.view(-1)
        idx = idx.to(device=flat.device, dtype=torch.long)
        taken[mname] = (idx, flat[idx].clone())
        flat[idx] = 0
    return taken


def attach_sparse(model: torch.nn.Module, taken: dict[str, tuple], shapes: dict[str, tuple[int, int]],
                  dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Wrap each (now quantized) module in a ``SparseDelta`` carrying its taken values.

    ``shapes`` maps module name -> (out_features, in_features) of the original linear layer (quantized
    modules do not all keep a 2-D weight). Returns ``[(name, values buffer)]`` for the trainer.
    """
    out = []
    for mname, (idx, values) in taken.items():
        parent_name, _, attr = mname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, attr)
        out_f, in_f = shapes[mname]
        wrapped = SparseDelta(base, idx, values, in_f, out_f, dtype)
        setattr(parent, attr, wrapped)
        out.append((f"{mname}.values", wrapped.values))
    return out
