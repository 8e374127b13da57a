"""Diagnostic: how much of a quantized-ZO method's two-point estimate is signal? QuZO's (the codes) and QZO's (the
scales) projected gradients on SmolLM2's NF4 and int8 layers against the exact ones, and for QuZO the share of
its variance that stochastic rounding adds.

    python bench/zo_signal.py [--methods quzo qzo] [--quant nf4-plain int8] [--eps 1e-3 1e-2]
                              [--directions 16] [--json results/bench/zo_signal.json]

SmolLM2-135M quantized as the quantized-zo suite quantizes it, the method's trainable as its cells build it
(QuZO: every code of the block linears, stochastic rounding; QZO: every quantization scale, a float32 absmax
per 64 weights on nf4-plain, per row on int8), Rademacher z, the claims batch (16 packed SST-2 rows), eval mode
as a ZO step runs. For each of ``--directions`` step seeds, with z = z(seed) over the trained values:

  exact    the directional derivative grad L . z, from grad L(W) at the weights W the layers stand for (each
           dequantized into a float32 copy of the model; one backward serves every direction): for QuZO z is
           over the weights; for QZO over the scales, dL/ds = sum over a scale's weights of dL/dW * W / s
  method   the method's estimate (L+ - L-) / (2 eps) through its own passes on the quantized model (QuZO:
           W+ = Q(W + eps z) on the codes; QZO: s + eps z on the scales the forward reads), for QuZO twice:
           with the step's rounding noise, and with a second, independent draw of it for the same z

Reported per method, quant and eps: the rms of each, the correlation of the method's estimate with the exact
one over the directions, and for QuZO the share of codes the +eps perturbation moved and the rounding noise's
standard deviation (sd(g1 - g2) / sqrt 2 over the two draws). signal / noise is var(exact) over the rounding
noise's variance: a ZO-SGD step moves along g z, so where the noise's variance is many times the signal's,
many steps average it out before the expected descent shows. int8's forwards also quantize activations, which
the gap between ``exact`` and the mean of QuZO's two draws (or QZO's estimate) carries.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from benchio import keep

from zobench.methods.quzo import CodeTrainable
from zobench.methods.qzo import ScaleTrainable
from zobench.models import load_model
from zobench.quant import QuantContext, get_backend, quantize_model
from zobench.quant.bnb import NF4Plain
from zobench.quant.codes import INT8_MAX, code_layers, row_scales
from zobench.tasks import get_task, scoring
from zobench.zo.masks import linear_layers


def batch(tokenizer):
    split = get_task("sst2").sample(None, n_train=16, n_dev=0, n_test=0, seed=0)
    return scoring.encode(split.train, tokenizer, "classification", max_length=128, train=True, shared=True,
                          pack=True)


def dequantized(layer) -> torch.Tensor:
    """The float32 [out, in] weight a bitsandbytes layer's codes and scales stand for."""
    if layer.kind == "int8":
        return layer.codes.float() * row_scales(layer.module).float().view(-1, 1) / INT8_MAX
    return NF4Plain.dequantize(layer.module).float().view(layer.shape)  # the 4-bit backends' own dequantize


def exact_gradients(layers) -> list[torch.Tensor]:
    """grad L(W) for each layer's [out, in] weight, on a float32 SmolLM2 holding the dequantized weights."""
    loaded = load_model("smollm2")
    model = loaded.model.eval()
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    weights = []
    for layer in layers:
        p = params[f"{layer.name}.weight"]
        p.data = dequantized(layer).clone()
        p.requires_grad_(True)
        weights.append(p)
    scoring.loss(model, batch(loaded.tokenizer)).backward()
    return [w.grad.detach().clone() for w in weights]


def scale_gradient(layer, grad: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """dL/ds for each of a layer's scales: the sum over the weights it scales of dL/dW * W / s (W = code * s)."""
    w = dequantized(layer)
    if layer.kind == "int8":
        return (grad * layer.codes.float() / INT8_MAX).sum(1)
    per = grad.numel() // scales.numel()  # weights a 4-bit block scale covers
    s = scales.float().view(-1, 1)
    unit = torch.where(s != 0, w.view(-1, per) / s.where(s != 0, torch.ones_like(s)), 0.0)  # the codes' levels
    return (grad.view(-1, per) * unit).sum(1)


def estimate(trainable, model, data, seed: int, eps: float) -> float:
    with torch.inference_mode():
        trainable.apply(seed, eps)
        lp = float(scoring.loss(model, data))
        trainable.apply(seed, -eps)  # (QuZO restores +eps in the same pass)
        lm = float(scoring.loss(model, data))
        trainable.restore()
    return (lp - lm) / (2 * eps)


def moved_share(trainable: CodeTrainable, seed: int, eps: float) -> float:
    before = [layer.codes.clone() for layer in trainable.layers]
    trainable.apply(seed, eps)
    if trainable.layers[0].kind == "int8":
        moved = sum(int((layer.codes != b).sum()) for layer, b in zip(trainable.layers, before))
    else:  # two codes a byte: count the nibbles that changed
        moved = sum(int(((layer.codes >> 4) != (b >> 4)).sum() + ((layer.codes & 15) != (b & 15)).sum())
                    for layer, b in zip(trainable.layers, before))
    trainable.restore()
    assert all(torch.equal(layer.codes, b) for layer, b in zip(trainable.layers, before)), "restore is not exact"
    return moved / trainable.numel


def corr(a, b) -> float:
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / (math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) or 1.0)


def rms(xs) -> float:
    return math.sqrt(statistics.fmean(x * x for x in xs))


def run(method: str, quant: str, epsilons: list[float], n: int) -> dict:
    loaded = load_model("smollm2")
    model = loaded.model.eval()
    backend = get_backend(quant)
    quantize_model(model, backend, QuantContext(tokenizer=loaded.tokenizer), linear_layers(model))
    data = batch(loaded.tokenizer)
    layers = code_layers(model)
    grads = exact_gradients(layers)
    seeds = [1000 + k for k in range(n)]
    if method == "quzo":
        trainable = CodeTrainable(layers)
        exact = [sum(float(g.view(-1).double() @ trainable.layer_z(seed, k)) for k, g in enumerate(grads))
                 for seed in seeds]
    else:
        scales = [(layer.name, backend.scales(layer.module)) for layer in layers]
        trainable = ScaleTrainable(scales)
        ds = torch.cat([scale_gradient(layer, g, s) for layer, g, (_, s) in zip(layers, grads, scales)])
        exact = [float(ds.double() @ trainable.z(seed).double()) for seed in seeds]
    del grads
    out = {"exact": exact, "by_eps": {}}
    for eps in epsilons:
        t = time.perf_counter()
        row = {"rms_exact": rms(exact)}
        if method == "quzo":
            draws = []
            for shift in (0, 1 << 40):  # the step's own noise, then an independent draw for the same z
                trainable.noise_shift = shift
                draws.append([estimate(trainable, model, data, seed, eps) for seed in seeds])
            trainable.noise_shift = 0
            g1, g2 = draws
            noise_sd = statistics.stdev([a - b for a, b in zip(g1, g2)]) / math.sqrt(2)
            row.update(moved=moved_share(trainable, seeds[0], eps), rms_method=rms(g1), corr=corr(g1, exact),
                       corr_mean_of_draws=corr([(a + b) / 2 for a, b in zip(g1, g2)], exact), noise_sd=noise_sd,
                       signal_over_noise=statistics.variance(exact) / noise_sd ** 2, g1=g1, g2=g2)
            said = (f"moved {100 * row['moved']:.1f}% of codes; corr {row['corr']:+.2f} (mean of 2 draws "
                    f"{row['corr_mean_of_draws']:+.2f}); rounding noise sd {noise_sd:.2f}; signal / noise "
                    f"{row['signal_over_noise']:.3f}")
        else:
            g = [estimate(trainable, model, data, seed, eps) for seed in seeds]
            row.update(rms_method=rms(g), corr=corr(g, exact), g=g)
            said = f"corr {row['corr']:+.3f}"
        row["seconds"] = time.perf_counter() - t
        out["by_eps"][str(eps)] = row
        print(f"  {method} {quant} eps {eps:g}: rms exact {row['rms_exact']:.2f}, {method} {row['rms_method']:.2f}; "
              f"{said} ({row['seconds']:.0f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", choices=["quzo", "qzo"], default=["quzo", "qzo"])
    ap.add_argument("--quant", nargs="+", choices=["nf4-plain", "int8"], default=["nf4-plain", "int8"])
    ap.add_argument("--eps", nargs="+", type=float, default=[1e-3, 1e-2])
    ap.add_argument("--directions", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.directions < 3:
        ap.error("--directions: at least 3 (a correlation and a spread are taken over them)")
    torch.set_num_threads(2)
    results = {m: {q: run(m, q, args.eps, args.directions) for q in args.quant} for m in args.methods}
    if args.json:
        keep({"directions": args.directions, "results": results, "when": time.strftime("%Y-%m-%d")}, args.json)


if __name__ == "__main__":
    main()
