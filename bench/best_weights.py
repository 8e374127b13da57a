"""Benchmark: bringing back a dense ZO run's weights at its best dev step, from disk or by replay.

Full ZO cannot keep its best step's weights in memory beside the live ones without doubling the model,
so zobench either writes them to an anonymous file at each new best dev score (``DenseTrainable.save_raw``,
read back with ``load_raw``) or replays the recorded (seed, coefficient) trajectory from the initial
weights (``zobench.zo.trainer.replay``: three passes of direction draws per step, no forward). This
measures both on the embedded SmolLM2-135M in float32, all weights trainable, 2 CPU threads, in one
process: the write and the read (median of ``--rounds``), and replay seconds per step (median over
``--steps`` replayed steps), so a reader can price the replay of any best step.

    python bench/best_weights.py [--rounds 5] [--steps 5] [--json results/bench/best_weights.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchio import keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)

    from transformers.utils import logging as hf_logging

    from zobench.models import load_model
    from zobench.zo.optim import make_optimizer
    from zobench.zo.trainable import DenseTrainable
    from zobench.zo.trainer import replay

    hf_logging.disable_progress_bar()
    model = load_model(args.model, "float32", 0, False, "cpu").model
    trainable = DenseTrainable([(n, p) for n, p in model.named_parameters()])
    optimizer = make_optimizer("sgd", lr=1e-7)
    trajectory = [[[1000 + s, 0.1]] for s in range(args.steps)]

    write, read, per_step = [], [], []
    with tempfile.TemporaryFile(prefix="zobench-bench-") as f:
        for _ in range(args.rounds):
            t = time.perf_counter()
            trainable.save_raw(f)
            write.append(time.perf_counter() - t)
            t = time.perf_counter()
            trainable.load_raw(f)
            read.append(time.perf_counter() - t)
    for step in range(args.steps):
        t = time.perf_counter()
        replay(trainable, optimizer, trajectory, 1e-3, step + 1, start=step)
        per_step.append(time.perf_counter() - t)

    out = {"model": args.model, "numel": trainable.numel, "mib": trainable.nbytes / 2**20, "threads": 2,
           "write_s": statistics.median(write), "read_s": statistics.median(read),
           "replay_s_per_step": statistics.median(per_step), "rounds": args.rounds, "steps": args.steps}
    out["replay_steps_per_write_and_read"] = (out["write_s"] + out["read_s"]) / out["replay_s_per_step"]
    print(f"{args.model}: {out['mib']:.0f} MiB of weights; write {out['write_s']:.2f} s, read {out['read_s']:.2f} s; "
          f"replay {out['replay_s_per_step']:.2f} s a step (write + read = "
          f"{out['replay_steps_per_write_and_read']:.1f} replayed steps)")
    if args.json:
        keep(out, args.json)


if __name__ == "__main__":
    main()
