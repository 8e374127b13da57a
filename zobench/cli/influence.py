"""`zobench influence train | cache | query`: fine-tune on instruction data and keep the result, sketch one
gradient per training example into a cache, rank the cached examples for a prompt and its generation."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from zobench.cell.delta import claim_target, read
from zobench.cli.common import HELP, at_least, fraction, one_line, positive_float
from zobench.errors import EXIT_OK, UserError, shown
from zobench.files import atomic_write
from zobench.influence.cache import build_cache, cache_meta, load_cache_dir
from zobench.influence.retrieve import query_sketch, scan, token_contributions
from zobench.influence.session import Session
from zobench.influence.spec import InfluenceSpec
from zobench.influence.store import SKETCH, SketchStore
from zobench.influence.train import fine_tune, fine_tune_config, summary
from zobench.outdirs import check_output_dir, check_output_file, refuse_unsafe_target
from zobench.report.owned import check_replaceable_page
from zobench.report.query import query_html, query_markdown
from zobench.tasks.instruction import load_alpaca

DATA_HELP = ("Alpaca-format rows {instruction, input, output}: a JSON list or JSON Lines; a row is named by "
             "its 'id' field, else its position in the file")


def add_parser(sub) -> None:
    p = sub.add_parser("influence", help=HELP["influence"])
    isub = p.add_subparsers(dest="influence_command", required=True)
    c = isub.add_parser("cache", help="sketch one gradient per training example into a cache directory")
    c.add_argument("--model", default=None, help="default: the delta's base model, else smollm2")
    c.add_argument("--adapter", default=None, help="LoRA adapter directory of the fine-tuned model")
    c.add_argument("--delta", default=None, help="the fine-tuned result kept by `--save` (sparse, LoRA, tensors)")
    c.add_argument("--data", required=True, help=DATA_HELP)
    c.add_argument("--n-train", type=at_least(1), default=None, help="number of examples (seeded sample; default all)")
    c.add_argument("--seed", type=at_least(0), default=0, help="the seed that draws the examples (as a run's seed)")
    c.add_argument("--scope", default="lora", help="lora | all | sensitive (with a sparse --delta: its indices)")
    c.add_argument("--k", type=at_least(1, 1 << 26), default=1 << 16, help="sketch size (default 65536)")
    c.add_argument("--sketch-seed", type=at_least(0), default=0, help="the sketch's seed (permutation and signs)")
    c.add_argument("--no-normalize", action="store_true", help="skip layer-wise normalization")
    c.add_argument("--max-length", type=at_least(2, 1 << 20), default=256)  # a prompt token and a response one
    c.add_argument("--workers", type=at_least(1, 1024), default=None,
                   help="processes filling disjoint rows (default 1; with --executor ray: one per GPU, else "
                        "one per node)")
    c.add_argument("--executor", default="local", help="local (default) | ray (needs zobench[ray])")
    c.add_argument("--address", default=None, help="with --executor ray: an existing cluster; else a private "
                                                    "local Ray")
    c.add_argument("--data-dir", default=None, help="where c4/ is (scope sensitive)")
    c.add_argument("--out", required=True, help="cache directory (resumed when it exists and matches)")
    t = isub.add_parser("train", help="fine-tune on an instruction file and keep the result (--save) for cache")
    t.add_argument("--model", default="smollm2")
    t.add_argument("--data", required=True, help=DATA_HELP)
    t.add_argument("--n-train", type=at_least(1), default=None, help="number of examples (seeded sample; default all)")
    t.add_argument("--seed", type=at_least(0), default=0, help="the seed that draws the examples and the batches")
    t.add_argument("--method", default="lora", help="lora (first-order) | sensitive | random (ZO, sparse)")
    t.add_argument("--steps", type=at_least(1, 10**8), default=300)
    t.add_argument("--lr", type=positive_float, default=None, help="default: 3e-4 for lora, 1e-4 for ZO")
    t.add_argument("--batch-size", type=at_least(1, 1 << 16), default=8)
    t.add_argument("--max-length", type=at_least(2, 1 << 20), default=128)
    t.add_argument("--density", type=fraction, default=1e-3, help="ZO: the fraction of linear weights trained")
    t.add_argument("--data-dir", default=None, help="where c4/ is (--method sensitive; default: packaged sample)")
    t.add_argument("--save", required=True, help="directory for the kept result (a zobench delta)")
    t.add_argument("--overwrite", action="store_true", help="replace a delta already at --save")
    q = isub.add_parser("query", help="rank the cached training examples for a prompt and its generation")
    q.add_argument("--cache", required=True)
    q.add_argument("--instruction", required=True)
    q.add_argument("--input", default="")
    q.add_argument("--generation", required=True, help="the model's answer to explain")
    q.add_argument("--tokens", default=None, help="comma-separated words of the generation to explain")
    q.add_argument("--top", type=at_least(1), default=10)
    q.add_argument("--metric", default="cosine", help="cosine | dot")
    q.add_argument("--explain", type=at_least(0), default=1, help="token-wise scores for this many top examples")
    q.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    q.add_argument("--html", default=None, help="also write a page highlighting the influential tokens")


def run(args) -> int:
    return {"cache": _cache, "query": _query, "train": _train}[args.influence_command](args)


def _train(args) -> int:
    claim_target(args.save, args.overwrite, "--save")
    examples = load_alpaca(args.data, n=args.n_train, seed=args.seed)
    lr = args.lr if args.lr is not None else (3e-4 if args.method == "lora" else 1e-4)
    cfg = fine_tune_config(args.model, len(examples), args.method, steps=args.steps, batch_size=args.batch_size,
                           lr=lr, max_length=args.max_length, seed=args.seed, density=args.density,
                           data_dir=args.data_dir, save=args.save, overwrite=args.overwrite)
    record = fine_tune(cfg, examples, on_log=lambda s, loss: print(f"  step {s + 1}/{args.steps}  loss {loss:.4f}",
                                                                   file=sys.stderr, flush=True))
    out, a = summary(record), record.artifact
    print(f"{args.method} on {len(examples)} examples, {args.steps} steps in {out['train_s']:.0f} s: loss "
          f"{out['loss_first']:.4f} -> {out['loss_last']:.4f}, {out['trainable']:,} trained values")
    print(f"saved:  {a['path']} ({a['kind']}, {a['bytes'] / 2**20:.2f} MiB)")
    return EXIT_OK


def _cache(args) -> int:
    model = args.model
    if model is None:
        model = read(args.delta)["base"]["model"] if args.delta else "smollm2"
    spec = InfluenceSpec.from_dict({"model": model, "adapter": args.adapter, "delta": args.delta,
                                    "scope": args.scope,
                                    "k": args.k, "sketch_seed": args.sketch_seed, "normalize": not args.no_normalize,
                                    "max_length": args.max_length, "data_dir": args.data_dir}, "influence cache")
    refuse_unsafe_target(args.out, "influence cache", "--out")
    if Path(args.out).is_symlink():
        raise UserError(f"--out {args.out}: is a symbolic link; the influence cache must be a directory of its own")
    check_output_dir(Path(args.out).parent, "influence cache")
    examples = load_alpaca(args.data, n=args.n_train, seed=args.seed)

    def progress(done, total):
        if done % 50 == 0 or done == total:
            print(f"  {done}/{total} examples", file=sys.stderr, flush=True)

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected a number of workers >= 1")
    cpus = os.cpu_count() or 1
    if args.executor != "ray" and (args.workers or 1) > cpus:  # each worker loads the model: memory, not speed
        raise UserError(f"--workers {args.workers}: more than this machine's {cpus} CPUs; a local build runs at "
                        f"most one worker per CPU (each loads its own copy of the model)")
    if args.address and args.executor != "ray":
        raise UserError(f"--address {args.address}: only --executor ray joins a cluster")
    # On Ray the workers take the cluster's GPUs when it has any; a local build stays on this CPU.
    try:
        stats = build_cache(spec, examples, args.out, workers=args.workers, progress=progress,
                            device="auto" if args.executor == "ray" else "cpu", executor=args.executor,
                            address=args.address)
    except UserError as e:  # the model the delta named failed: say which delta named it
        if args.model is not None or not args.delta or str(args.delta) in str(e):
            raise
        raise UserError(f"--delta {args.delta}: its base model: {one_line(e)}") from None
    for w in stats.get("per_worker", []):
        rate_w = f"{w['examples_per_s']:.2f} examples/s" if w["examples_per_s"] else "no rows"
        print(f"  worker {w['worker']}: {w['rows']} rows, {rate_w}"
              + (f", {w['lost_chunks']} chunks lost and redone" if w["lost_chunks"] else ""), file=sys.stderr)
    rate = stats.get("examples_per_s")
    how = " (measured when it was built)" if not stats["rows"] and rate else ""
    print(f"{args.out}: {len(examples)} examples ({stats.get('already', 0)} already cached), "
          f"{stats['rows']} sketched" + (f" at {rate:.2f} examples/s{how}" if rate else ""))
    return EXIT_OK


def _query(args) -> int:
    if not args.generation.strip():
        raise UserError("--generation: empty; give the model's answer whose training examples to find")
    if args.html:
        check_replaceable_page(check_output_file(args.html, "page"))
    spec, examples = load_cache_dir(args.cache)
    store = SketchStore.open(args.cache)
    if store.n != len(examples):  # a row of sketches per example, in order
        raise UserError(f"{args.cache}/meta.json: n = {store.n} rows of sketches against {len(examples)} examples in "
                        f"examples.jsonl; not one cache")
    for what in ("adapter", "delta"):
        if getattr(spec, what) and not Path(getattr(spec, what)).is_dir():
            raise UserError(f"{args.cache}/spec.json: {what} {getattr(spec, what)} is gone; the query needs the "
                            f"same model")
    session = Session(spec)
    # k is the sketch's size: min(spec.k, the scope's dimension), as the store has it
    want = dict(cache_meta(spec, examples), k=session.sketcher.cfg.k)
    if json.loads(json.dumps(want, default=str)) != {k: store.meta.get(k) for k in want}:
        raise UserError(f"{args.cache}/meta.json: the model or adapter changed since the cache was made")
    words = [w.strip() for w in args.tokens.split(",") if w.strip()] if args.tokens else None
    prompt = {"instruction": args.instruction, "input": args.input}
    q, info = query_sketch(session, prompt, args.generation, words)
    result = scan(store, q[None], args.metric)
    if not np.isfinite(result.scores).all():  # a sketch row zobench wrote is finite: this one was damaged
        bad = int((~np.isfinite(result.scores[0])).nonzero()[0][0])
        raise UserError(f"{args.cache}/{SKETCH}: row {bad} (example {shown(examples[bad]['id'])}) scores "
                        f"{result.scores[0, bad]}: the cache's sketches are not finite numbers")
    top = result.top(args.top)[0]
    by_id = {e["id"]: e for e in examples}
    rows = [{"rank": r + 1, "id": examples[i]["id"], "score": float(result.scores[0, i]),
             "instruction": examples[i]["instruction"], "input": examples[i].get("input", ""),
             "output": examples[i]["output"]} for r, i in enumerate(top)]
    for row in rows[:args.explain]:
        row["tokens"] = token_contributions(session, by_id[row["id"]], q, args.metric)
    out = {"query": {**prompt, "generation": args.generation, **info}, "metric": args.metric,
           "scan_s": result.seconds, "top": rows}
    if args.html:
        atomic_write(args.html, query_html(out), "page")
    print(json.dumps(out, indent=1) if args.json else query_markdown(out))
    return EXIT_OK
