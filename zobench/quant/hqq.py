"""HQQ (half-quadratic quantization), 4-bit with groups of 64, through the ``hqq`` package.

HQQ needs no calibration data: each layer's zero points and scales are fitted to its own weights by a
few proximal iterations, so layers are quantized one at a time. The layer is hqq's ``HQQLinear`` with
its default torch backend (``HQQBackend.PYTORCH``: unpack, dequantize to the compute dtype, matmul),
which runs on CPU and CUDA; the backend is a class-wide setting in hqq, so it is left as it is.
"""

from __future__ import annotations

import torch

from zobench.gates import hqq
from zobench.quant.base import Backend, QuantContext, Storage

INSTALL = "pip install 'zobench[hqq]' (or: pip install 'hqq==0.2.8.post1')"
BITS, GROUP_SIZE = 4, 64


class HQQ(Backend):
    name = "hqq"
    requires = ("hqq",)
    install = INSTALL
    perturbable = False
    # 4-bit codes packed two per uint8; per group of 64 a scale and a zero point, both kept in the
    # compute dtype: 4 B per group for float16 / bfloat16 models (priced here), 8 B for float32 ones.
    storage = Storage(bits=BITS, group_size=GROUP_SIZE, group_bytes=4.0)

    def quantize_linear(self, linear: torch.nn.Linear, ctx: QuantContext) -> torch.nn.Module:
        BaseQuantizeConfig, HQQLinear = hqq.quantizer()
        # axis=1 groups consecutive input features of a row, as GPTQ and bitsandbytes do.
        config = BaseQuantizeConfig(nbits=BITS, group_size=GROUP_SIZE, axis=1)
        q = HQQLinear(linear, config, compute_dtype=ctx.dtype, device=str(ctx.device), del_orig=True)
        q.eval()
        return q
