"""qzo: QZO (Shang et al., "Fine-tuning Quantized Neural Networks with Zeroth-order Optimization", arXiv
2505.13430, ICLR 2026): zeroth-order fine-tuning of a quantized model through its quantization scales.

A quantized weight is a scale times a code: ``w = s * c``. The codes are discrete and cannot move by eps * z,
but the scales are continuous (one per block of 64 weights in nf4-plain and fp4-plain, one per output row in
int8, one per group of 128 input columns of a row in gptq, held in float16 there). QZO
keeps every code as it is and trains the scales alone, with MeZO's two-point estimate and seed trick:

    s + eps z -> L+ ;  s - eps z -> L- ;  d = clip((L+ - L-) / (2 eps), -C, C) ;  s <- max(s - lr d z, 0)

Clipping the directional derivative d (DDC, ``clip_threshold`` = C) bounds every step, whatever a noisy
low-precision forward returned: with SGD a scale moves by at most lr * C * |z| per step. The update is
projected onto non-negative scales, as the paper's is: a scale taken below zero would flip the signs of its
whole block (an absmax is a magnitude), so it stops at zero.

The scales of every quantized linear in scope are one trainable vector (``ScaleTrainable``, the sparse
trainable's whole-tensor form): the live scales are the tensors the layers' forwards read, perturbed in
place; a float32 master keeps the exact trained values; z comes from the engine's counter-based directions,
keyed by the step's seed and each scale's index in the concatenation of the layers' scales (in module
order). What a run keeps is the trained scales (``delta_parts``).
"""

from __future__ import annotations

import torch

from zobench.errors import UserError
from zobench.fingerprint import scales_fingerprint
from zobench.methods.base import Method, Price, PriceInputs, register
from zobench.methods.common import z_extra, zo_stepper
from zobench.quant import get_backend
from zobench.zo.masks import linear_layers
from zobench.zo.sizes import OPT_STATE_VALUES
from zobench.zo.trainable import SparseTrainable


class ScaleTrainable(SparseTrainable):
    """The scales of quantized layers, every value trainable, perturbed in place."""

    keeps_own_delta = True

    def __init__(self, layers: list[tuple[str, torch.Tensor]], direction: str = "rademacher",
                 generator: str = "philox"):
        for name, s in layers:  # float32 (bitsandbytes) or float16 (GPTQ): written from a float32 master
            if s.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not s.is_contiguous():
                raise RuntimeError(f"{name}: its scales are {s.dtype}, not a contiguous floating-point tensor")
        super().__init__(layers, {name: None for name, _ in layers}, direction, generator)
        self.start = scales_fingerprint(layers)

    @torch.no_grad()
    def update(self, grads, optimizer, step: int) -> None:
        super().update(grads, optimizer, step)
        if self._project():
            self._write(self.master)

    @torch.no_grad()
    def fold_step(self, grads, optimizer, step: int, seed: int, scale: float) -> None:
        super().fold_step(grads, optimizer, step, seed, scale)
        if self._project():  # rare: the fused pass wrote the perturbed live scales from the unprojected ones
            self.apply(seed, scale)

    def _project(self) -> bool:
        """QZO's projection onto non-negative scales; whether any scale needed it."""
        if not bool((self.master < 0).any()):
            return False
        self.master.clamp_(min=0)
        return True

    def delta_parts(self) -> tuple[str, dict[str, torch.Tensor], dict]:
        """What a run keeps (``cell.keep``): ``(kind, tensors, extra)``, each trained layer's scales under the
        layer's name, and the identity of the scales it started from."""
        tensors = {name: v.clone() for name, v in zip(self.names, self.master.split(self.sizes))}
        return "scales", tensors, {"scales_base": self.start}


def check_resolution(layers: list[tuple[str, torch.Tensor]], eps: float, dtype: torch.dtype) -> None:
    """One line when ``eps`` is too small for the forward to see: the weights it builds are ``code * scale``
    rounded to ``dtype``, from scales held in their own dtype (float16 in GPTQ), and a scale moved by less than
    half the coarser one's relative resolution leaves most of them where they were, so L+ and L- would differ
    by rounding alone."""
    typical = float(torch.stack([s.detach().abs().float().median() for _, s in layers]).median())
    coarser = max((dtype, layers[0][1].dtype), key=lambda t: torch.finfo(t).eps)
    floor = torch.finfo(coarser).eps / 2
    if typical > 0 and eps / typical < floor:
        what = "weights" if coarser == dtype else "scales"
        raise UserError(f"key 'eps' = {eps:g}: moves a typical quantization scale ({typical:.3g}) by "
                        f"{eps / typical:.2g} of itself, below half the resolution of {coarser} {what} ({floor:.2g}): "
                        f"the two forwards would see nearly the same weights; raise eps"
                        + (" or use dtype float32" if what == "weights" else ""))


@register
class QZO(Method):
    name = "qzo"

    def build_stepper(self, run):
        cfg = run.cfg
        backend = get_backend(cfg.quant)
        layers = [(name, backend.scales(run.model.get_submodule(name)))
                  for name in backend.scaled_layers(run.model, linear_layers(run.model))]
        if not layers:
            raise UserError(f"method 'qzo': model {cfg.model} has no quantized linear layers to train the scales of")
        check_resolution(layers, cfg.eps, run.model.get_input_embeddings().weight.dtype)
        trainable = ScaleTrainable(layers, cfg.direction, cfg.generator)
        return zo_stepper(run, trainable, clip=cfg.clip_threshold)

    def price(self, inputs: PriceInputs) -> Price:
        cfg = inputs.cfg
        # One scale per group (nf4-plain, fp4-plain, gptq) or per output row (int8) of every quantized linear. The
        # live scales are part of the quantized weights' storage; the method holds their float32 master and its
        # optimizer state.
        backend = get_backend(cfg.quant)
        n = 0 if inputs.storage is None else sum(backend.scale_count(o, i) for o, i in inputs.arch.linears)
        # apply: z, master + scale * z; update: the estimate and one z at a time, plus Adam's denominator
        update = n * (4 + z_extra(cfg) + 4 + 4 + (8 if cfg.optimizer == "adam" else 0))
        return Price(trainable=4 * n, optimizer=n * OPT_STATE_VALUES[cfg.optimizer] * 4, update=update, nnz=n)
