"""`zobench influence cache` and `zobench influence query`: parse flags, call one function, print."""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

from zobench.errors import UserError


def add_parsers(sub) -> None:
    p = sub.add_parser("influence", help="training-data influence: cache sketched gradients, query them")
    isub = p.add_subparsers(dest="influence_command", required=True)
    c = isub.add_parser("cache", help="sketch one gradient per training example into a cache directory")
    c.add_argument("--model", default="smollm2")
    c.add_argument("--adapter", default=None, help="LoRA adapter directory of the fine-tuned model")
    c.add_argument("--data", required=True, help="Alpaca-format JSON (list of {instruction, input, output})")
    c.add_argument("--n-train", type=int, default=None, help="number of examples (seeded sample; default all)")
    c.add_argument("--seed", type=int, default=0, help="the seed that draws the examples (as a run's seed)")
    c.add_argument("--scope", default="lora", help="lora | all | sensitive")
    c.add_argument("--k", type=int, default=1 << 16, help="sketch size (default 65536)")
    c.add_argument("--sketch-seed", type=int, default=0, help="the sketch's seed (permutation and signs)")
    c.add_argument("--no-normalize", action="store_true", help="skip layer-wise normalization")
    c.add_argument("--max-length", type=int, default=256)
    c.add_argument("--workers", type=int, default=1, help="processes filling disjoint rows")
    c.add_argument("--data-dir", default=None, help="where c4/ is (scope sensitive)")
    c.add_argument("--out", required=True, help="cache directory (resumed when it exists and matches)")
    q = isub.add_parser("query", help="rank the cached training examples for a prompt and its generation")
    q.add_argument("--cache", required=True)
    q.add_argument("--instruction", required=True)
    q.add_argument("--input", default="")
    q.add_argument("--generation", required=True, help="the model's answer to explain")
    q.add_argument("--tokens", default=None, help="comma-separated words of the generation to explain")
    q.add_argument("--top", type=int, default=10)
    q.add_argument("--metric", default="cosine", help="cosine | dot")
    q.add_argument("--explain", type=int, default=1, help="token-wise scores for this many top examples")
    q.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    q.add_argument("--html", default=None, help="also write a page highlighting the influential tokens")


def cache(args) -> int:
    from zobench.influence.cache import build_cache
    from zobench.influence.data import load_alpaca
    from zobench.influence.session import InfluenceSpec

    spec = InfluenceSpec.from_dict({"model": args.model, "adapter": args.adapter, "scope": args.scope,
                                    "k": args.k, "sketch_seed": args.sketch_seed, "normalize": not args.no_normalize,
                                    "max_length": args.max_length, "data_dir": args.data_dir}, "influence cache")
    from zobench.files import check_output_dir

    check_output_dir(Path(args.out).parent, "influence cache")
    examples = load_alpaca(args.data, n=args.n_train, seed=args.seed)

    def progress(done, total):
        if done % 50 == 0 or done == total:
            print(f"  {done}/{total} examples", file=sys.stderr, flush=True)

    stats = build_cache(spec, examples, args.out, workers=args.workers, progress=progress)
    rate = stats.get("examples_per_s")
    print(f"{args.out}: {len(examples)} examples ({stats.get('already', 0)} already cached), "
          f"{stats['rows']} sketched" + (f" at {rate:.2f} examples/s" if rate else ""))
    return 0


def query(args) -> int:
    from zobench.influence.cache import cache_meta, load_cache_dir
    from zobench.influence.retrieve import query_sketch, scan, token_contributions
    from zobench.influence.session import Session
    from zobench.influence.store import SketchStore

    from zobench.files import atomic_write, check_output_file

    if args.html:
        check_output_file(args.html, "page")
    spec, examples = load_cache_dir(args.cache)
    store = SketchStore.open(args.cache)
    if spec.adapter and not Path(spec.adapter).is_dir():
        raise UserError(f"{args.cache}/spec.json: adapter {spec.adapter} is gone; the query needs the same model")
    session = Session(spec)
    want = cache_meta(spec, examples)
    if want != {k: store.meta.get(k) for k in want}:
        raise UserError(f"{args.cache}/meta.json: the model or adapter changed since the cache was made")
    words = [w.strip() for w in args.tokens.split(",") if w.strip()] if args.tokens else None
    prompt = {"instruction": args.instruction, "input": args.input}
    q, info = query_sketch(session, prompt, args.generation, words)
    result = scan(store, q[None], args.metric)
    top = result.top(args.top)[0]
    rows = [{"rank": r + 1, "row": int(i), "score": float(result.scores[0, i]),
             "instruction": examples[i]["instruction"], "input": examples[i].get("input", ""),
             "output": examples[i]["output"]} for r, i in enumerate(top)]
    for row in rows[:args.explain]:
        row["tokens"] = token_contributions(session, examples[row["row"]], q, args.metric)
    out = {"query": {**prompt, "generation": args.generation, **info}, "metric": args.metric,
           "scan_s": result.seconds, "top": rows}
    if args.html:
        atomic_write(args.html, _html(out), "page")
    print(json.dumps(out, indent=1) if args.json else _markdown(out))
    return 0


def _strongest(tokens: list, n: int = 5) -> set[int]:
    return set(sorted(range(len(tokens)), key=lambda i: -tokens[i][1])[:n])


def _markdown(out: dict) -> str:
    q = out["query"]
    lines = [f"query: {q['instruction'][:100]!r} -> {q['generation'][:100]!r} (tokens: {q['tokens']})", "",
             f"| rank | row | {out['metric']} | instruction | response |", "|---:|---:|---:|---|---|"]
    for r in out["top"]:
        resp = r["output"]
        if "tokens" in r:
            best = _strongest(r["tokens"])
            resp = "".join(f"**{t}**" if i in best else t for i, (t, _) in enumerate(r["tokens"]))
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:90]  # noqa: E731
        lines.append(f"| {r['rank']} | {r['row']} | {r['score']:.4f} | {cell(r['instruction'])} | {cell(resp)} |")
    return "\n".join(lines)


def _html(out: dict) -> str:
    """Each explained example's response with its tokens shaded by their score (red: pushes toward
    the query's generation)."""
    parts = [f"<h2>{html.escape(out['query']['instruction'])}</h2>",
             f"<p><b>generation:</b> {html.escape(out['query']['generation'])}</p><ol>"]
    for r in out["top"]:
        body = html.escape(r["output"])
        if "tokens" in r:
            peak = max((abs(s) for _, s in r["tokens"]), default=1.0) or 1.0
            body = "".join(f'<span style="background:rgba(220,40,40,{max(s, 0) / peak:.2f})" '
                           f'title="{s:.4f}">{html.escape(t)}</span>' for t, s in r["tokens"])
        parts.append(f"<li><p>{r['score']:.4f} &middot; <i>{html.escape(r['instruction'])}</i></p><p>{body}</p></li>")
    return "<!doctype html><meta charset=utf-8><body style='font-family:sans-serif;max-width:60em'>" + \
        "".join(parts) + "</ol></body>"
