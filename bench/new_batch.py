"""Benchmark: what a forward on a batch the process has not seen yet costs, against the same batch again.

On an H200 the first forward of each ZO step took ~45 ms longer than the step's second forward on the same
batch (tiny Llama, float16: forward_plus 45-48 ms, forward_minus 3 ms; a forward cell's step 49 ms against
its in-cell reference 3 ms; results/gpu/smoke-cuda.jsonl). Batches are padded to their longest member, so
each step brings new tensors and, usually, a new sequence length. This separates the candidates, each
timed interleaved round-robin in one process (medians over ``--rounds``):

    new_length        fresh token ids, a length never seen before   (what most ZO steps get)
    same              that batch again, right after                 (the in-cell reference's situation)
    new_tensors       fresh token ids, a length already seen        (new host tensors and their copies)
    same_seen_length  that batch again, right after
    new_rows          a length already seen, a number of rows never seen (packed rows vary in count too)
    same_rows         that batch again, right after
    new_length_no_cudnn, same_no_cudnn: new_length and same with torch's cuDNN attention left out of the
                      SDPA backends (on the H200 the new-length cost was cuDNN attention's plan for the shape)

each with the driver-level memory sampler (``zobench.measure.device``, as every cell runs it) off and on,
through the cells' own loss (``zobench.tasks.scoring.loss``). Then one new-length forward under the
profiler: its top operators by self CPU time show where the extra time goes.

    python bench/new_batch.py [--device cuda] [--dtype float16] [--model random:tiny-llama] [--rounds 7]
                              [--json results/gpu/new_batch_cuda.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from benchio import keep
from torch.nn.attention import SDPBackend, sdpa_kernel


def make_batch(batch: int, length: int, vocab: int, gen: torch.Generator) -> dict:
    """A classification batch as ``scoring.encode`` lays it out: 2 options per example, right-padded, the
    option's one token scored, lengths varying inside the batch."""
    seqs = 2 * batch
    ids = torch.randint(3, vocab, (seqs, length), generator=gen)
    lens = torch.randint(length // 2, length + 1, (seqs,), generator=gen)
    lens[0] = length  # the batch is as long as its longest member
    pos = torch.arange(length)[None, :]
    attn = (pos < lens[:, None]).long()
    option = pos == (lens[:, None] - 1)
    return {"input_ids": ids * attn, "attention_mask": attn, "option_mask": option,
            "n_options": torch.full((batch,), 2), "labels": torch.randint(0, 2, (batch,), generator=gen)}


def main() -> None:
    from zobench.measure.device import DeviceMemory
    from zobench.models import load_model
    from zobench.tasks.scoring import loss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--model", default="random:tiny-llama")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=48, help="first sequence length; new ones count up from it")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = load_model(args.model, dtype=args.dtype, seed=0, device=args.device).model
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    seen = [args.length + i for i in range(4)]
    fresh = iter(range(args.length + 64, args.length + 10_000))
    rows = iter(range(args.batch + 1, args.batch + 10_000))  # example counts never seen (2 rows each)

    def timed(batch: dict) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            float(loss(model, batch))
        sync()
        return (time.perf_counter() - t) * 1000

    for length in seen:  # warm-up: every "seen" length once
        timed(make_batch(args.batch, length, vocab, gen))
    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for sampler in (False, True):
            mem = DeviceMemory().start() if sampler and cuda else None
            suffix = "+sampler" if mem is not None else ""
            new_len = make_batch(args.batch, next(fresh), vocab, gen)
            times.setdefault("new_length" + suffix, []).append(timed(new_len))
            times.setdefault("same" + suffix, []).append(timed(new_len))
            new_tensors = make_batch(args.batch, seen[r % len(seen)], vocab, gen)
            times.setdefault("new_tensors" + suffix, []).append(timed(new_tensors))
            times.setdefault("same_seen_length" + suffix, []).append(timed(new_tensors))
            new_rows = make_batch(next(rows), seen[r % len(seen)], vocab, gen)
            times.setdefault("new_rows" + suffix, []).append(timed(new_rows))
            times.setdefault("same_rows" + suffix, []).append(timed(new_rows))
            if cuda and not sampler:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                    plain = make_batch(args.batch, next(fresh), vocab, gen)
                    times.setdefault("new_length_no_cudnn", []).append(timed(plain))
                    times.setdefault("same_no_cudnn", []).append(timed(plain))
            if mem is not None:
                mem.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    again = {"new_length": "same", "same": "same", "new_tensors": "same_seen_length",
             "same_seen_length": "same_seen_length", "new_rows": "same_rows", "same_rows": "same_rows",
             "new_length_no_cudnn": "same_no_cudnn", "same_no_cudnn": "same_no_cudnn"}  # each against itself again
    for k, v in med.items():
        kind, plus, sampler = k.partition("+")
        print(f"{k:26s} {v:8.2f} ms  ({v / med[again[kind] + plus + sampler]:.2f}x the same batch again)")

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    batch = make_batch(args.batch, next(fresh), vocab, gen)
    with profile(activities=activities) as prof:
        timed(batch)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(table)
    if args.json:
        meta = {"device": args.device, "dtype": args.dtype, "model": args.model, "batch": args.batch,
                "rounds": args.rounds, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if cuda else None}
        keep({"meta": meta, "median_ms": med, "runs_ms": times,
              "profile_new_length": table}, args.json)


if __name__ == "__main__":
    main()
