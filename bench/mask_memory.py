"""Benchmark: where the sensitive mask's device memory goes, stage by stage, on Llama-2-7B's shapes.

    python bench/mask_memory.py --device cuda [--layers 4] [--calib 64x512] [--json results/gpu/mask_memory.json]

The mask phase of a streamed cell on a GPU is ``models.layerwise.squared_gradients`` feeding
``zo.masks.topk_mask``'s running top-k. This runs that pair on ``random:llama-2-7b`` (float16, its first
``--layers`` blocks: every block has the same shapes, so a block's moment is the whole model's, and the
top-k's largest merges come first) and reads the allocator's peaks between stage boundaries:

  inputs     the first block's inputs for every calibration sequence (the model's forward up to block 0)
  draw       a block's linears drawn on the device (``Deferred.draw``)
  forward    every sequence through a block, no autograd
  loss       the final norm, the head and the loss on the last hidden state, and its backward
  backward   a block's forward recomputed with autograd and its backward, squared gradients summed
  top-k      the running top-k merging one block linear's scores

Each variant runs in a child process of its own (a fresh allocator): ``as is``; ``no cache return`` (the
allocator's cache kept between blocks, ``layerwise.RETURN_CACHE`` off); ``expandable`` (the allocator's
expandable segments, ``PYTORCH_ALLOC_CONF=expandable_segments:True``). Reported per variant and stage: the
peak allocated and reserved MiB, and the phase's peaks (reserved + the CUDA context is what the card holds).
On a CPU it runs the same code and reports RSS only (a check of the script, not of a GPU's memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchio import keep

from zobench.data.calibration import corpus_batches, find_corpus
from zobench.models import layerwise
from zobench.models.load import builtin_tokenizer, random_config
from zobench.models.stream import draw_model, empty_model
from zobench.zo import masks as M

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
VARIANTS = {"as is": {}, "no cache return": {"ZOBENCH_BENCH_NO_CACHE_RETURN": "1"},
            "expandable": {"PYTORCH_ALLOC_CONF": "expandable_segments:True",
                           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}


class Stages:
    """The allocator's peaks between stage boundaries, by stage name (the largest of a stage's spans)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.label = "start"
        self.peaks: dict[str, dict[str, float]] = {}

    def enter(self, label: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            now = {"allocated_mib": torch.cuda.max_memory_allocated() / MIB,
                   "reserved_mib": torch.cuda.max_memory_reserved() / MIB}
            old = self.peaks.setdefault(self.label, {k: 0.0 for k in now})
            for k, v in now.items():
                old[k] = max(old[k], v)
            torch.cuda.reset_peak_memory_stats()
        self.label = label


def child(out: Path, device: str, layers: int, n_seq: int, seq_len: int, density: float) -> None:
    dev = torch.device(device)
    if os.environ.get("ZOBENCH_BENCH_NO_CACHE_RETURN"):
        layerwise.RETURN_CACHE = False
    stages = Stages(dev)
    config = random_config("llama-2-7b", False)
    config.num_hidden_layers = layers
    model = empty_model(config, torch.float16 if dev.type == "cuda" else torch.float32)
    deferred = draw_model(model, 0, dev, M.linear_layers(model), "random:llama-2-7b")
    params = M.scoped_params(model, "linear")
    batches = corpus_batches(find_corpus(None, None), builtin_tokenizer(), n_seq, seq_len, config.vocab_size)

    first_inputs, block, draw = layerwise._first_block_inputs, layerwise._block, deferred.draw

    def first_inputs_(*a, **k):
        stages.enter("inputs")
        return first_inputs(*a, **k)

    def block_(*a, **k):
        stages.enter("backward" if torch.is_grad_enabled() else "forward")
        return block(*a, **k)

    def draw_(*a, **k):
        stages.enter("draw")
        return draw(*a, **k)

    layerwise._first_block_inputs, layerwise._block, deferred.draw = first_inputs_, block_, draw_
    model.lm_head.register_forward_pre_hook(lambda *_: stages.enter("loss"))

    def measured(scores):
        for item in scores:
            stages.enter("top-k")
            yield item
        stages.enter("end")

    if stages.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / MIB
    start = time.perf_counter()
    scores = layerwise.squared_gradients(model, deferred, batches, [n for n, _ in params])
    mask = M.topk_mask(measured(scores), density, False, sum(p.numel() for _, p in params))
    stages.enter("end")
    result = {"seconds": time.perf_counter() - start, "nnz": sum(int(i.numel()) for i in mask.values()),
              "stages": {k: v for k, v in stages.peaks.items() if k not in ("start", "end")}}
    if stages.cuda:
        result["before_mib"] = base
        result["phase"] = {k: max(v[k] for v in result["stages"].values()) for k in ("allocated_mib", "reserved_mib")}
    else:
        import resource

        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--calib", default="64x512", help="sequences x tokens (suites/llama7b.yaml's: 64x512)")
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n_seq, seq_len = (int(x) for x in args.calib.split("x"))
    if args.child:
        child(args.child, args.device, args.layers, n_seq, seq_len, args.density)
        return
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            out = Path(tmp) / "out.json"
            done = subprocess.run([sys.executable, __file__, "--device", args.device, "--layers", str(args.layers),
                                   "--calib", args.calib, "--density", str(args.density), "--child", str(out)],
                                  cwd=ROOT, env={**os.environ, **VARIANTS[name]})
            runs[name] = json.loads(out.read_text()) if done.returncode == 0 else {"failed": done.returncode}
            out.unlink(missing_ok=True)
            r = runs[name]
            stages = "  ".join(f"{s} {v['allocated_mib']:.0f}/{v['reserved_mib']:.0f}"
                               for s, v in r.get("stages", {}).items() if v)
            print(f"{name:<16} {r.get('seconds', 0):6.1f} s  allocated/reserved MiB: {stages or r}", flush=True)
    summary = {"model": "random:llama-2-7b", "layers": args.layers, "calibration": args.calib,
               "density": args.density, "device": args.device,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "torch": torch.__version__, "variants": runs}
    if args.json:
        keep(summary, args.json)


if __name__ == "__main__":
    main()
