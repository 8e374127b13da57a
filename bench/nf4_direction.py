"""Diagnostic: is the ZO signal there on an NF4 model? Each NF4 forward way's two-point estimate
(L(S + eps z) - L(S - eps z)) / 2 eps against the exact one.

    python bench/nf4_direction.py [--directions 12] [--json results/bench/nf4_direction.json]

SmolLM2-135M with NF4 block linears and 0.1% random trainable values kept apart (the dense-and-sparse layer,
exactly as a sensitive cell builds it, with a random mask: the question is the forward, not the mask), the
claims suite's batch (16 packed SST-2 rows), eval mode as a ZO step runs. For each of ``--directions``
Rademacher z on the trainable values, the projected gradient g = (L+ - L-) / (2 eps) is computed with:
  dequant      every 4-bit layer dequantized to float32, one float32 matmul (the reference: the NF4 model's
               own loss, computed in float32)
  zobench      the layers as a cell builds them (quant/bnb.py: bitsandbytes' AVX512-BF16 repack switched off,
               S merged into the dequantized weight)
  bnb-bf16     bitsandbytes' Linear4bit eval forward left as bitsandbytes sets it up (on AVX512-BF16 CPUs it
               repacks the weight for a path that rounds activations to bfloat16), S added apart
and, for scale, the same g for eps = 1e-3 on the float model. Reported: the correlation of each way's g with
the reference over the directions, and the relative error |g - g_ref| / rms(g_ref). A ZO step's update is
g z: when g is noise, training is a random walk.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from benchio import keep

from zobench.measure.env import cpu_flags
from zobench.models import load_model
from zobench.quant import QuantContext, get_backend, quantize_model
from zobench.tasks import get_task, scoring
from zobench.zo import masks as M

EPS = 1e-3


def batch(tokenizer):
    split = get_task("sst2").sample(None, n_train=16, n_dev=0, n_test=0, seed=0)
    return scoring.encode(split.train, tokenizer, "classification", max_length=128, train=True, shared=True,
                          pack=True)


def build(way: str):
    """The NF4 dense-and-sparse model, its trainable value tensors, and its batch."""
    loaded = load_model("smollm2")
    model = loaded.model
    mask = M.random_mask(M.scoped_params(model, "linear"), 1e-3, seed=0)
    values = []
    if way != "float":
        backend = get_backend("nf4")
        ctx = QuantContext(device="cpu", dtype=torch.float32, tokenizer=loaded.tokenizer, seed=0)
        if way == "bnb-bf16":
            backend.merges_on = lambda device: False  # S apart: a repacked weight cannot be dequantized
        values = [v for _, v in quantize_model(model, backend, ctx, M.linear_layers(model), mask)]
        if way == "bnb-bf16":
            for m in model.modules():
                if type(m).__name__ == "Linear4bit":  # what bitsandbytes itself decides for this CPU
                    m.support_avx512bf16_for_cpu = bnb_bf16_capable()
        if way == "dequant":
            for m in model.modules():
                if type(m).__name__ == "SparseDelta":
                    m.dequantize = backend.dequantize  # dequantize, scatter S, one float32 matmul
    else:
        params = dict(model.named_parameters())
        values = [params[n] for n in mask]  # the float model's selected entries: perturbed through an index
        values = [(p, idx) for p, idx in zip(values, mask.values())]
    model.eval()
    return model, values, batch(loaded.tokenizer)


def bnb_bf16_capable() -> bool:
    from bitsandbytes.nn.modules import has_avx512bf16

    return bool(has_avx512bf16())


def perturb(values, z, scale):
    with torch.no_grad():
        for v, zz in zip(values, z):
            if isinstance(v, tuple):
                p, idx = v
                p.data.view(-1).index_add_(0, idx.long(), scale * zz)
            else:
                v.add_(scale * zz)


def estimates(way: str, n: int) -> list[float]:
    torch.manual_seed(0)
    model, values, data = build(way)
    sizes = [(v[1].numel() if isinstance(v, tuple) else v.numel()) for v in values]
    out = []
    with torch.inference_mode():
        for k in range(n):
            gen = torch.Generator().manual_seed(1000 + k)
            z = [torch.randint(0, 2, (s,), generator=gen).float() * 2 - 1 for s in sizes]
            perturb(values, z, EPS)
            lp = float(scoring.loss(model, data))
            perturb(values, z, -2 * EPS)
            lm = float(scoring.loss(model, data))
            perturb(values, z, EPS)
            out.append((lp - lm) / (2 * EPS))
    return out


def corr(a, b):
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / ((sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5 or 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--directions", type=int, default=12)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = {}
    for way in ("dequant", "zobench", "bnb-bf16", "float"):
        t = time.perf_counter()
        g[way] = estimates(way, args.directions)
        print(f"  {way}: {time.perf_counter() - t:.0f} s", flush=True)
    ref = g["dequant"]
    rms = (sum(x * x for x in ref) / len(ref)) ** 0.5
    rows = {}
    for way in ("zobench", "bnb-bf16", "float"):
        err = [abs(a - b) / rms for a, b in zip(g[way], ref)]
        rows[way] = {"corr_with_dequant": corr(g[way], ref), "median_rel_err": statistics.median(err)}
    print(f"\nprojected gradients over {args.directions} Rademacher directions, eps {EPS}, CPU flags "
          f"{' '.join(cpu_flags()) or '-'}")
    for way, vals in g.items():
        print(f"  {way:8s} " + " ".join(f"{x:+8.3f}" for x in vals))
    for way, r in rows.items():
        print(f"  {way} vs dequant: correlation {r['corr_with_dequant']:+.3f}, median |g - g_ref| / rms(g_ref) "
              f"{r['median_rel_err']:.2f}")
    if args.json:
        keep({"cpu_flags": cpu_flags(), "eps": EPS, "g": g, "rows": rows,
              "when": time.strftime("%Y-%m-%d")}, args.json)


if __name__ == "__main__":
    main()
