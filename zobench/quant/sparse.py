"""The dense-and-sparse layer: a quantized dense part plus a few trainable 16/32-bit values.

Quantized weights cannot be perturbed by eps * z in place: a 4-bit code moves in steps far larger than
eps. SensZOQ (arXiv 2406.02913) therefore splits each weight W into

    W = D + S,   D = W with the selected entries zeroed, then quantized;   S = the selected entries only,

keeps S's values in the model's dtype, and computes ``y = D(x) + x @ S^T``. ZO perturbs and updates only
S's values, so the sparse ZO machinery (``SparseTrainable``) runs unchanged on them.

How ``D(x) + x @ S^T`` is computed depends on the device, each way picked by measurement
(bench/sparse_delta.py; figures in results/bench/measurements.md):

    merge   (bitsandbytes 4-bit, on CUDA and CPU alike: ``Backend.merges_on``) the
            base's batched forward builds D in the compute dtype anyway (dequantize, then one dense
            matmul); the layer does that itself and scatters S's few values into that temporary first:
            ``x @ (D + S)^T``, one matmul, no [tokens, out] delta. On an H200 the separate sparse product
            cost 3-7x the quantized layer's own forward at 7B shapes; on a CPU 1.2-1.5x, merged 0.9-1.06x.
    CSR     (elsewhere) S^T in CSR form (one row per input feature), multiplied as a sparse matrix where
            torch can (float32 on CPU; CUDA); never a dense [out, in] S. On a CPU it beat a gather +
            index_add_ straight into the output on every layer but the smallest.
    gather  (float16 / bfloat16 on CPU, which has no CSR kernel) gather-multiply-scatter over chunks of
            rows whose temporary is bounded.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable

import torch

# Values per temporary of the gather path ([rows, nnz]), so its memory is bounded (the estimator prices it).
GATHER_LIMIT = 1 << 22


def _transposed_csr(flat: torch.Tensor, in_features: int, out_features: int):
    """Row-major flat indices into [out, in] -> (order, crow, col) of the CSR of the transpose [in, out]."""
    rows, cols = flat // in_features, flat % in_features
    order = torch.argsort(cols * out_features + rows)
    crow = torch.zeros(in_features + 1, dtype=torch.long, device=flat.device)
    crow[1:] = torch.bincount(cols, minlength=in_features).cumsum(0)
    # int32 indices: half the bytes of int64, and MKL's CSR product was ~10% faster with them here.
    return order, crow.int(), rows[order].int()


class SparseDelta(torch.nn.Module):
    """``base(x) + x @ S^T``; ``values`` (a buffer in the compute dtype) are what ZO perturbs.

    ``dequantize`` (the backend's, or None): base -> its dense weight in the compute dtype, where that is
    how the base's batched forward computes anyway. Given, the layer merges (module docstring) and keeps S
    as row-major int32 flat indices; otherwise as the CSR of S^T. ``attach_sparse`` gives it where the
    backend merges on the layer's device.
    """

    def __init__(self, base: torch.nn.Module, flat_index: torch.Tensor, values: torch.Tensor,
                 in_features: int, out_features: int, dtype: torch.dtype,
                 dequantize: Callable[[torch.nn.Module], torch.Tensor] | None = None):
        super().__init__()
        self.base, self.in_features, self.out_features = base, in_features, out_features
        flat_index = flat_index.to(values.device)
        self.dequantize = dequantize
        # ``values`` are in row-major order of their entries on every way, so a direction seed moves the
        # same weights whichever way a device takes (z is drawn in the order of ``values``): a run, its
        # checkpoint and its trajectory mean the same on a GPU, a CPU that merges and one that does not.
        order = torch.argsort(flat_index)
        self.register_buffer("flat", flat_index[order].int())  # < 2^31: out * in of any 7B-70B layer
        self.register_buffer("values", values[order].to(dtype).contiguous())
        if dequantize is None:  # CSR of S^T, and where each of its nonzeros is in ``values``
            csr_order, crow, col = _transposed_csr(self.flat.long(), in_features, out_features)
            self.register_buffer("crow", crow)
            self.register_buffer("col", col)
            self.register_buffer("csr_order", csr_order.int())
        else:
            self.crow = self.col = self.csr_order = None
        self._csr = True  # falls back to the gather path once if torch has no sparse kernel for the dtype
        self.bypass = False  # True: the quantized layer alone (the reference forward of a ZO cell)

    @property
    def way(self) -> str:
        """How the forward adds S: "merge", "csr" or "gather" (module docstring)."""
        if self.dequantize is not None:
            return "merge"
        return "csr" if self._csr_for(self.values) else "gather"

    def _csr_for(self, t: torch.Tensor) -> bool:
        """Whether the product of ``t``'s device and dtype goes the CSR way (torch has a kernel there)."""
        return self._csr and (t.is_cuda or t.dtype in (torch.float32, torch.float64))

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def flat_index(self) -> torch.Tensor:
        """The selected entries as row-major indices into [out, in], in the order of ``values``."""
        return self.flat.long()

    def merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (D + S)^T + bias``: S's values scattered into the dequantized dense part, one matmul."""
        w = self.dequantize(self.base)
        w = w if w.dtype == x.dtype else w.to(x.dtype)
        w.view(-1).index_add_(0, self.flat, self._values_as(w))
        bias = getattr(self.base, "bias", None)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    def sparse_product(self, x2: torch.Tensor) -> torch.Tensor:
        """[n, in] -> [n, out]: ``x2 @ S^T`` without a dense S."""
        if self._csr_for(x2):
            try:
                return self.csr_product(x2)
            except (NotImplementedError, RuntimeError):
                self._csr = False
        return self.gather_product(x2)

    def _values_as(self, x2: torch.Tensor) -> torch.Tensor:
        return self.values if self.values.dtype == x2.dtype else self.values.to(x2.dtype)

    def _csr_values(self, x2: torch.Tensor) -> torch.Tensor:
        """The values in the CSR's order (one gather of the layer's few values)."""
        return self._values_as(x2)[self.csr_order]

    def csr_product(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ S^T`` as a dense-times-CSR product (raises where torch has no kernel for the dtype)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            st = torch.sparse_csr_tensor(self.crow, self.col, self._csr_values(x2),
                                         (self.in_features, self.out_features), check_invariants=False)
        return x2 @ st

    def gather_product(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ S^T`` by gather, multiply and index_add_ over chunks of rows (a bounded temporary)."""
        values = self._csr_values(x2)
        cols = torch.repeat_interleave(torch.arange(self.in_features, device=x2.device), self.crow.diff())
        rows = self.col.long()
        out = x2.new_zeros(x2.shape[0], self.out_features)
        step = max(1, GATHER_LIMIT // max(self.nnz, 1))
        for i in range(0, x2.shape[0], step):
            part = x2[i:i + step]
            out[i:i + step].index_add_(1, rows, part[:, cols] * values)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dequantize is not None and self.nnz and not self.bypass:
            return self.merged_forward(x)
        y = self.base(x)
        if self.nnz == 0 or self.bypass:
            return y
        delta = self.sparse_product(x.reshape(-1, self.in_features)).view(*y.shape[:-1], self.out_features)
        # In place: the layer's output is fresh, so adding into it keeps one [tokens, out] tensor fewer
        # alive than y + delta (ZO runs without autograd; matmul's backward would not need y either).
        return y.add_(delta.to(y.dtype))


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
                  dtype: torch.dtype, dequantize: Callable[[torch.nn.Module], torch.Tensor] | None = None
                  ) -> list[tuple[str, torch.Tensor]]:
    """Wrap each (now quantized) module in a ``SparseDelta`` carrying its taken values.

    ``shapes`` maps module name -> (out_features, in_features) of the original linear layer (quantized
    modules do not all keep a 2-D weight); ``dequantize``, the backend's (``Backend.dequantize``) where it
    merges on this device (``Backend.merges_on``), else None. Returns ``[(name, values buffer)]`` for the
    trainer.
    """
    out = []
    for mname, (idx, values) in taken.items():
        parent_name, _, attr = mname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, attr)
        out_f, in_f = shapes[mname]
        wrapped = SparseDelta(base, idx, values, in_f, out_f, dtype, dequantize)
        setattr(parent, attr, wrapped)
        out.append((f"{mname}.values", wrapped.values))
    return out


@torch.no_grad()
def pack_values(model: torch.nn.Module, vectors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Move the dense-and-sparse layers' value vectors (``attach_sparse``'s, in their order) into one flat
    buffer, each layer's ``values`` a view of its part, and return those views. A ZO pass then writes every
    value in one operation (``SparseTrainable`` sees the views adjoin) instead of one per layer: on a GPU,
    where each operation is a kernel launch, a pass over a 7B model's 224 layers was ~1,200 of them."""
    if len(vectors) < 2 or len({(v.dtype, v.device) for _, v in vectors}) != 1:
        return vectors
    flat = torch.empty(sum(v.numel() for _, v in vectors), dtype=vectors[0][1].dtype, device=vectors[0][1].device)
    out, at = [], 0
    for name, v in vectors:
        part = flat[at:at + v.numel()]
        part.copy_(v.view(-1))
        model.get_submodule(name.removesuffix(".values"))._buffers["values"] = part
        out.append((name, part))
        at += v.numel()
    return out


@contextmanager
def sparse_bypassed(model: torch.nn.Module):
    """Within the block, every dense-and-sparse layer computes its quantized base alone (no sparse add):
    the model is then the plain quantized model that a suite's forward cell measures."""
    layers = [m for m in model.modules() if isinstance(m, SparseDelta)]
    for m in layers:
        m.bypass = True
    try:
        yield
    finally:
        for m in layers:
            m.bypass = False
