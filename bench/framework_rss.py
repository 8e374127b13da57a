"""Measure the per-process memory floor of a suite cell on this machine: everything but the model.

The estimator (``zobench/estimate.py``) adds a constant for what a cell's process holds whatever the
model: the interpreter, torch, transformers and what they import, the tokenizer, the task's examples,
CPU kernel state after a first forward. This script measures it the most literal way: it runs a real
``forward`` cell through the launcher (fresh spawned child, the launcher's malloc settings, same
phases and same peak accounting as any suite cell) on a Llama so small that its weights and
activations are a few KiB, and reports that cell's ``derived.peak_mib``.

    .venv/bin/python bench/framework_rss.py [--repeat 3] [--device cpu|cuda] [--json out.json]

Run it after changing installed packages (an optional backend that transformers imports eagerly, such
as hqq, moves the floor) and update ``CPU_FRAMEWORK_MIB`` in zobench/estimate.py. With ``--device cuda``
the cell's peak is CUDA max allocated memory, the floor behind ``CUDA_FRAMEWORK_MIB``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

# Weights of this model: about 3k values (vocab 64 x hidden 16, one layer): nothing against the floor.
NEGLIGIBLE_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
    "vocab_size": 64, "max_position_embeddings": 512, "tie_word_embeddings": True, "pad_token_id": 2,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "rms_norm_eps": 1e-5,
}


def measure_once(config_path: Path, device: str = "cpu") -> dict:
    from zobench.launcher import derive, make_record, run_in_child
    from zobench.matrix import expand
    from zobench.suite import parse_suite

    suite = parse_suite({"name": "framework", "reference": False, "defaults": {
        "model": f"random:{config_path}", "method": "forward", "task": "sst2", "batch_size": 1,
        "max_length": 8, "n_train": 8, "n_dev": 0, "n_test": 0, "steps": 4, "warmup_steps": 1,
        "eval_before": False, "eval_after": False, "device": device}}, "framework")
    (cell,) = expand(suite)
    outcome = run_in_child(cell, 300, lambda e: None)
    if outcome.status != "ok":
        raise SystemExit(f"framework cell failed: {outcome.reason}\n{outcome.traceback_tail or ''}")
    rec = make_record(suite, cell, outcome, "", 0.0, {}, {})
    rec.pop("estimate", None)
    peak = derive(rec, [])["peak_mib"]
    return {"peak_mib": peak, "phases": {k: {m: v[m] for m in v if m.endswith("_mib")}
                                         for k, v in rec["phases"].items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "negligible-llama.json"
        path.write_text(json.dumps(NEGLIGIBLE_LLAMA))
        runs = [measure_once(path, args.device) for _ in range(args.repeat)]
    from zobench.measure.env import environment

    env = environment()
    out = {"device": args.device, "framework_peak_mib_median": statistics.median(r["peak_mib"] for r in runs),
           "runs": runs, "env": {k: env.get(k) for k in ("cpu", "cpu_count", "torch_threads", "versions", "python")}}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
