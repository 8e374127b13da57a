"""bitsandbytes: 4-bit NF4 / FP4 (QLoRA's formats) and 8-bit LLM.int8.

``nf4`` is QLoRA's NF4 with double quantization (its per-block absmax values are themselves 8-bit codes);
``nf4-plain`` (and ``fp4-plain``) is the same 4-bit codes with a plain float32 absmax per block of 64 weights,
the continuous scales a method can perturb in place (QZO, ``methods.qzo``). LLM.int8's per-row absmax (``SCB``) is plain
float32 too. ``Backend.scales`` hands those tensors over.

bitsandbytes 0.50 quantizes on the CPU too: a ``Params4bit`` / ``Int8Params`` is quantized when the module
is moved to a device, so each layer is built from the float weight and moved once. It may print that the
optional ``kernels`` package is missing and fall back to its own CPU kernels; results are the same.
"""

from __future__ import annotations

import torch

from zobench.gates import bnb
from zobench.quant.base import Backend, QuantContext, Storage

INSTALL = "pip install 'bitsandbytes==0.50.2' (a core dependency of zobench: `make venv` installs it)"


class _FourBit(Backend):
    quant_type = "nf4"
    compress_statistics = True  # double quantization: the absmax values 8-bit quantized in blocks of 256
    requires = ("bitsandbytes",)
    measures_floor = True
    install = INSTALL
    # 4 bits per weight; per block of 64 an 8-bit absmax (double quantization, QLoRA's default),
    # plus one float32 scale per 256 blocks for those absmax values.
    storage = Storage(bits=4, group_size=64, group_bytes=1 + 4 / 256)

    def quantize_transient(self, numel: int, dtype_bytes: int, device: str) -> float:
        # bitsandbytes' CPU quantize_4bit on an [11008, 4096] layer: 10.4 bytes a weight above the float32
        # layer, 14.4 above a float16 / bfloat16 one (results/bench/measurements.md); on CUDA one kernel.
        if device != "cpu":
            return 0.0
        return numel * (10.4 if dtype_bytes == 4 else 14.4)

    def quantize_linear(self, linear: torch.nn.Linear, ctx: QuantContext) -> torch.nn.Module:
        nn = bnb.load().nn
        q = nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=ctx.dtype, quant_type=self.quant_type,
                          compress_statistics=self.compress_statistics, device="meta")
        q.weight = nn.Params4bit(linear.weight.data, requires_grad=False,
                                     quant_type=self.quant_type, compress_statistics=self.compress_statistics)
        if linear.bias is not None:
            q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        # bitsandbytes, on a CPU with AVX512-BF16, repacks the weight at the first eval-mode forward for a path
        # that rounds the activations to bfloat16. A ZO step's signal is a loss difference at eps's scale, and
        # through that rounding it is mostly noise: the projected gradient correlated +0.34 with the layer's
        # exact one on SmolLM2 (bench/nf4_direction.py; an NF4 claims cell never learned). Dequantize-then-matmul
        # costs the same there (bench/nf4_forward.py: 1.11x the float forward against 1.13x), so every 4-bit
        # layer keeps that path, on every CPU.
        q.support_avx512bf16_for_cpu = False
        return q.to(ctx.device)

    @staticmethod
    def dequantize(module: torch.nn.Module) -> torch.Tensor:
        """The layer's [out, in] weight in its compute dtype, as its batched forward builds it."""
        bf = bnb.functional()
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("bitsandbytes repacked this 4-bit weight for its AVX512-BF16 CPU kernel; "
                               "its dense-and-sparse layer must add S apart (Backend.merges_on)")
        w = bf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        return w if module.compute_dtype is None else w.to(module.compute_dtype)

    def merges_on(self, device: str) -> bool:
        # A batched Linear4bit forward dequantizes, then runs one dense matmul (on a CPU too: the repacked
        # AVX512-BF16 path is switched off in quantize_linear), so merging S costs one scatter of its few values:
        # measured 0.9-1.06x the NF4 layer on a CPU, where the separate CSR product cost 1.2-1.5x
        # (bench/sparse_delta.py, bench/dense_sparse_model.py), and 3-7x on an H200.
        return device == "cpu" or device.startswith("cuda")


class NF4(_FourBit):
    name = "nf4"
    quant_type = "nf4"


class FP4(_FourBit):
    name = "fp4"
    quant_type = "fp4"


class NF4Plain(_FourBit):
    name = "nf4-plain"
    quant_type = "nf4"
    compress_statistics = False
    storage = Storage(bits=4, group_size=64, group_bytes=4)  # 4 bits per weight, a float32 absmax per 64

    @staticmethod
    def scales(module: torch.nn.Module) -> torch.Tensor:
        """The layer's float32 absmax, one per block of 64 weights: the forward reads it as it is (the
        dequantize-then-matmul path, ``quantize_linear``), so a change in place is a change of the layer."""
        state = module.weight.quant_state
        if state.nested or getattr(state, "packing_format_for_cpu", False) or module.support_avx512bf16_for_cpu:
            # The repacked AVX512-BF16 kernel casts the absmax to bfloat16: a perturbation below 2^-8 of a
            # scale would vanish in the forward.
            raise RuntimeError("this 4-bit layer's scales are not the plain float32 absmax its forward reads")
        return state.absmax


class FP4Plain(NF4Plain):
    """FP4's codes with nf4-plain's float32 absmax per 64 weights: QZO's FP4 form."""

    name = "fp4-plain"
    quant_type = "fp4"


class Int8(Backend):
    name = "int8"
    requires = ("bitsandbytes",)
    measures_floor = True
    install = INSTALL
    storage = Storage(bits=8, row_bytes=4)  # int8 weights + one float32 absmax (SCB) per output row

    def quantize_linear(self, linear: torch.nn.Linear, ctx: QuantContext) -> torch.nn.Module:
        nn = bnb.load().nn
        # threshold=6.0 is LLM.int8's outlier decomposition: input columns with a value above it run
        # in 16-bit, the rest in int8.
        q = nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False, threshold=6.0, device="meta")
        q.weight = nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return q.to(ctx.device)

    @staticmethod
    def scales(module: torch.nn.Module) -> torch.Tensor:
        """The layer's float32 absmax per output row (``SCB``). Its first forward moves the tensor from the
        weight to the layer's matmul state (``init_8bit_state``): the same tensor, which the matmul reads."""
        return module.state.SCB if module.state.SCB is not None else module.weight.SCB
