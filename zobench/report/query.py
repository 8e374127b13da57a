"""One influence query's result (``zobench influence query``): a markdown table of the top training
examples, or an HTML page with the influential tokens of each explained example shaded. Pure functions of
the result."""

from __future__ import annotations

import html

from zobench.report.influence import WIDTH, cell_text, highlighted
from zobench.report.owned import PAGE_MARK


def query_markdown(out: dict) -> str:
    q = out["query"]
    lines = [f"query: {q['instruction'][:100]!r} -> {q['generation'][:100]!r} (tokens: {q['tokens']})", "",
             f"| rank | id | {out['metric']} | instruction | response |", "|---:|---:|---:|---|---|"]
    for r in out["top"]:
        resp = highlighted(r["tokens"]) if "tokens" in r else cell_text(r["output"][:WIDTH])
        lines.append(f"| {r['rank']} | {r['id']} | {r['score']:.4f} | {cell_text(r['instruction'][:WIDTH])} | "
                     f"{resp} |")
    return "\n".join(lines)


def query_html(out: dict) -> str:
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
        "".join(parts) + "</ol></body>\n" + PAGE_MARK + "\n"
