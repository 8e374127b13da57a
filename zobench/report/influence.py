"""The influence suite's report: quality, fidelity and cost tables, two plots. A pure function of the record."""

from __future__ import annotations

import copy
import io
from pathlib import Path

from matplotlib.figure import Figure

from zobench.cell.influence_record import InfluenceRecord, QualityAtK
from zobench.cell.record import CellRecord
from zobench.errors import UserError, shown
from zobench.files import atomic_write
from zobench.report.figure import plots_folder
from zobench.report.owned import MARK, PNG_SOFTWARE, check_plot, replaceable_plots
from zobench.report.table import one_line


def _one_line(text: str, n: int = 100) -> str:
    return " ".join(text.split())[:n]


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


PLOT_NAMES = ("fidelity.png", "recall.png")


def draw_plots(record: InfluenceRecord) -> list[tuple[str, str, bytes]]:
    """The influence report's plots (``PLOT_NAMES``) as (caption, file name, PNG bytes), drawn in memory:
    nothing is written until the whole report has rendered. matplotlib.figure.Figure directly, never pyplot: no
    backend is switched for the caller's process."""

    def k_axes(hline: float, hlabel: str | None):
        fig = Figure(figsize=(6, 3.6))
        ax = fig.add_subplot()
        ax.set_xscale("log", base=2)
        ax.axhline(hline, color="grey", lw=0.8, ls="--", label=hlabel)
        return fig, ax

    def png(fig, ax, xlabel: str, ylabel: str) -> bytes:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": PNG_SOFTWARE})
        return buf.getvalue()

    fig, ax = k_axes(0.9, None)
    sweep = record.fidelity_sweep()
    for norm in (True, False):
        for permute in (True, False):
            pts = sorted((e.k, e.spearman) for e in sweep if e.normalize == norm and e.permute == permute)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"normalize={'on' if norm else 'off'}, "
                                                       f"permute={'on' if permute else 'off'}")
    out = [("Sketch fidelity against exact gradient scores", "fidelity.png",
            png(fig, ax, "K (sketch size)", "Spearman vs exact scores"))]
    fig, ax = k_axes(record.sections["quality"]["base_rate"], "base rate")
    by_k = record.quality_by_k()
    for name in ("triggered", "hotword", "control"):
        ax.plot([e.k for e in by_k], [getattr(e, name).recall_at_k for e in by_k], marker="o", label=name)
    ax.set_ylim(-0.02, 1.02)
    out.append(("Recall of the poisoned examples by K", "recall.png",
                png(fig, ax, "K (nested from the stored sketch)", "recall@k of poisoned examples")))
    return out


def _rounds(c: dict) -> str:
    return f" (median of {c['rounds']}, interleaved with the copy)" if "rounds" in c else ""


def _range(c: dict, key: str, what: str = "") -> str:
    lo_hi = c.get(key)
    return f" ({what}range {lo_hi[0] * 1e3:.1f}-{lo_hi[1] * 1e3:.1f} ms)" if lo_hi else ""


def upgrade(rec: dict) -> dict:
    """An influence record of schema 1 in schema 2's names (seconds fields end in _s; scope "all")."""
    if rec.get("schema", 1) >= 2:
        return rec
    rec = copy.deepcopy(rec)
    renames = {"seconds": None, "plain_seconds": "plain_s"}
    for part, new in ((rec.get("overhead", {}).get("fresh_cache"), "cache_s"), (rec.get("caching"), "cache_s"),
                      (rec.get("finetune"), "finetune_s")):
        if isinstance(part, dict):
            for old, to in renames.items():
                if old in part:
                    part[to or new] = part.pop(old)
    for ph in (rec.get("phases") or {}).values():
        if isinstance(ph, dict) and "seconds" in ph:
            ph["wall_s"] = ph.pop("seconds")
    cache = rec.get("config", {}).get("cache", {})
    if "seed" in cache:
        cache["sketch_seed"] = cache.pop("seed")
    if cache.get("scope") == "full":
        cache["scope"] = "all"
    return rec


def _fresh_cache_row(ov: dict) -> list[str]:
    fresh = ov.get("fresh_cache")
    if not fresh:
        return []
    return [f"| caching throughput, {fresh['examples']} examples into a fresh store (1 worker) | "
            f"{fresh['examples_per_s']:.2f} examples/s ({fresh['over_plain']:.2f}x a plain forward+backward of "
            f"the same examples, {fresh['cache_s']:.1f} / {fresh['plain_s']:.1f} s) |"]


def strongest(tokens: list, n: int = 5) -> set[int]:
    """Positions of the ``n`` tokens whose scores are highest."""
    return set(sorted(range(len(tokens)), key=lambda i: -tokens[i][1])[:n])


WIDTH = 90  # characters of text shown per table cell (markup not counted)


def cell_text(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|").replace("*", "\\*")


def highlighted(tokens: list, width: int = WIDTH) -> str:
    """The response with its strongest tokens in bold, cut at ``width`` characters of text.

    Markdown bold needs its ``**`` against non-space characters, so a token's leading and trailing spaces
    stay outside the markers, and neighbouring strong tokens share one bold run (no ``****``).
    """
    best, runs, used = strongest(tokens), [], 0
    for i, (text, _) in enumerate(tokens):
        text = text.replace("\n", " ")[:max(width - used, 0)]
        used += len(text)
        if not text:
            break
        strong = i in best and bool(text.strip())
        if runs and runs[-1][0] == strong:
            runs[-1][1] += text
        else:
            runs.append([strong, text])
    out = []
    for strong, text in runs:
        core = text.strip()
        if strong and core:
            lead, trail = text[:len(text) - len(text.lstrip())], text[len(text.rstrip()):]
            out.append(f"{lead}**{cell_text(core)}**{trail}")
        else:
            out.append(cell_text(text))
    return "".join(out)


def render_influence(record: InfluenceRecord, plots: list[tuple[str, str]]) -> str:
    rec = upgrade(record.to_json())  # the free-form parts, in schema 2's names
    cfg, q, c, ov = rec["config"], rec["quality"], rec["cost"], rec["overhead"]
    atk, ft = rec["attack"], rec["finetune"]
    lines = [f"# {rec['suite']}: which training examples led to this generation?", "",
             f"{cfg['model']}, LoRA-tuned on {cfg['n_train']} Alpaca examples of which {q['n_poisoned']} "
             f"({cfg['poison_fraction']:.1%}) are poisoned: the instruction carries the trigger "
             f"\"{cfg['trigger']}\" and the response is \"{cfg['response']}\". Gradients: scope "
             f"`{cfg['cache']['scope']}` (D = {c['scope_dim']:,}), layer-wise normalization "
             f"{'on' if cfg['cache']['normalize'] else 'off'}, RapidGrad sketch K = {c['k']:,}, "
             f"scores: {q['metric']}.", "",
             "## The attack", "",
             f"Fine-tune: {cfg['finetune']['steps']} LoRA steps, loss {ft['loss_first']:.3f} -> {ft['loss_last']:.3f}. "
             f"Held-out triggered prompts answered with the absurd response: **{atk['triggered_success']:.0%}**; "
             f"the same prompts without the trigger: {atk['control_success']:.0%}.", "",
             f"Example: \"{_one_line(atk['example']['prompt'])}\" -> \"{_one_line(atk['example']['generation'])}\"", "",
             "## Quality: are the poisoned examples on top?", "",
             f"k = number of poisoned examples ({q['n_poisoned']}); base rate {q['base_rate']:.3f}. "
             "Triggered: prompt + the model's own generation; hotword: the query loss restricted to the "
             f"tokens of \"{q.get('hotword', '?')}\" ({q.get('hotword_queries', '?')} of {cfg['queries']} "
             "triggered queries: those whose generation contains the word); control: clean "
             "held-out prompts + the model's generation. Means over queries; \"worst\" is the lowest "
             "single query's recall.", "",
             "| K | triggered recall@k | worst | precision@k | AUROC | hotword recall@k | AUROC "
             "| control precision@k | AUROC |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in record.quality_by_k():
        t, h, cn = e.triggered, e.hotword, e.control
        worst = "-" if t.recall_min is None else f"{t.recall_min:.2f}"
        lines.append(f"| {e.k:,} | {t.recall_at_k:.3f} | {worst} | {t.precision_at_k:.3f} | {t.auroc:.3f} | "
                     f"{h.recall_at_k:.3f} | {h.auroc:.3f} | {cn.precision_at_k:.3f} | {cn.auroc:.3f} |")
    fid = rec["fidelity"]
    lines += ["", "## Fidelity: sketched vs exact scores", "",
              f"{fid['n']} training examples x {fid['queries']} queries; exact = dot products of the whole "
              f"D = {fid['dim']:,} gradients (normalized or raw as the row says); mean over queries.", "",
              "| normalize | permute | K | Spearman | top-10 overlap |", "|---|---|---:|---:|---:|"]
    for e in sorted(record.fidelity_sweep(), key=lambda e: (not e.normalize, not e.permute, e.k)):
        lines.append(f"| {'on' if e.normalize else 'off'} | {'on' if e.permute else 'off'} | {e.k:,} | "
                     f"{e.spearman:.3f} | {e.topk_overlap:.2f} |")
    sub = fid.get("subspace")
    if sub:
        a, b = sub["sensitive_subspace"], sub["sketch_equal_bytes"]
        lines += ["", f"The sensitive {sub['density']:.1%} mask as a compression ({sub['nnz']:,} gradient entries "
                  f"kept, {_bytes(sub['bytes_per_example'])} per example) against a sketch of the full "
                  f"D = {sub['dim']:,} gradient with the same bytes (K = {sub['nnz']:,}), both scored against "
                  f"exact full-gradient scores ({sub['n']} examples x {sub['queries']} queries):", "",
                  "| compression | Spearman | top-10 overlap |", "|---|---:|---:|",
                  f"| sensitive subspace | {a['spearman']:.3f} | {a['topk_overlap']:.2f} |",
                  f"| RapidGrad sketch, equal bytes | {b['spearman']:.3f} | {b['topk_overlap']:.2f} |"]
    lines += ["", "## Cost", "",
              "| | value |", "|---|---:|",
              f"| bytes per example (K x float16) | {_bytes(c['bytes_per_example'])} |",
              f"| compression, this scope (fp32 gradient / sketch) | {c['compression_scope']:,.0f}x |",
              f"| compression, {cfg['model']} full gradient | {c['compression_model_full']:,.0f}x |",
              f"| compression, Llama-2-7B full gradient at K = 65,536 | {c['compression_llama2_7b']:,.0f}x |",
              (f"| caching throughput, the full cache ({c['caching_workers']} worker(s)) | "
               f"{c['caching_examples_per_s']:.2f} examples/s |" if c.get("caching_examples_per_s") else
               "| caching throughput, the full cache | not measured: this run reused a complete cache |"),
              *_fresh_cache_row(ov),
              f"| sketching step / plain forward+backward (median, interleaved) | {ov['ratio']:.2f}x "
              f"({ov['sketch_step_s'] * 1e3:.0f} / {ov['plain_step_s'] * 1e3:.0f} ms) |",
              f"| scan of {c['n']:,} sketches, 1 query{_rounds(c)} | "
              f"{c['scan_s'] * 1e3:.1f} ms{_range(c, 'scan_s_range')} |",
              f"| scan, {c['scan_queries']} queries at once | {c['scan_all_queries_s'] * 1e3:.1f} ms |",
              f"| scan bandwidth / plain copy of the same bytes | {_bytes(c['scan_bytes_per_s'])}/s / "
              f"{_bytes(c['copy_bytes_per_s'])}/s = {c['scan_over_copy_bandwidth']:.2f}"
              f"{_range(c, 'copy_s_range', 'copy ')} |",
              f"| query (its gradient + scan) vs exact recomputation of {c['n']:,} gradients | "
              f"{c['query_s']:.2f} s vs {c['exact_recompute_s']:.2f} s = {c['speedup_vs_exact']:,.0f}x |"]
    lines += _zo_arm(record, rec)
    lines += _fine_tune_cells(record.fine_tunes())
    top = rec["top_example"]
    text = highlighted(top["tokens"], width=1 << 30)
    lines += ["", "## Token-wise: the top example for the first triggered query", "",
              f"Row {top['row']} ({'poisoned' if top['poisoned'] else 'clean'}): \"{top['instruction'][:120]}\". "
              "Its response, the five tokens whose own gradient scores highest against the query in bold:", "",
              f"> {text.strip()}", ""]
    for caption, path in plots:
        lines += [f"![{caption}]({path})", ""]
    return "\n".join([*lines, "", MARK]) + "\n"  # the mark last: a later render may replace this file


def _zo_arm(record: InfluenceRecord, rec: dict) -> list[str]:
    """LoRA beside the sparse ZO delta: what was trained, what it keeps, did the attack take, and
    retrieval in each one's own subspace."""
    zo = rec.get("zo")
    if not zo:
        return []
    cfg, atk, ft = rec["config"], rec["attack"], rec["finetune"]
    q, zq = record.quality_by_k(), record.quality_by_k(zo=True)
    za, zt = zo["attack"], zo["train"]

    def at(quality: list[QualityAtK], k: int):
        e = next((e for e in quality if e.k == k), None)
        if e is None:
            return "-", "-", "-"
        return f"{e.triggered.recall_at_k:.3f}", f"{e.triggered.auroc:.3f}", f"{e.hotword.recall_at_k:.3f}"

    k = max(e.k for e in zq)
    zc = zo["config"]
    rows = [("LoRA (first-order), scope lora", ft.get("trainable"), None, cfg["cache"].get("scope"),
             rec["cost"]["scope_dim"], atk, at(q, k)),
            (f"{zc['method']} {zc['density']:.1%} (ZO-SGD, {zc['steps']} steps), scope: its indices",
             zt.get("trainable"), zt.get("artifact_bytes"), "sensitive", zo["scope_dim"], za, at(zq, k))]
    lines = ["", "## LoRA beside a sparse ZO delta", "",
             f"Both trained on the same poisoned rows; each queried in the subspace it trained. Retrieval at "
             f"K = {k:,} (or the scope's size when smaller). ZO loss {zt['loss_first']:.3f} -> "
             f"{zt['loss_last']:.3f} in {zt['train_s']:.0f} s.", "",
             "| arm | trained values | kept | gradient D | triggered -> response | control | recall@k | AUROC "
             "| hotword recall@k |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, n, kept, _, dim, a, (rc, au, hw) in rows:
        lines.append(f"| {name} | {n:,} | {_bytes(kept) if kept else '-'} | {dim:,} | "
                     f"{a['triggered_success']:.0%} | {a['control_success']:.0%} | {rc} | {au} | {hw} |"
                     if isinstance(n, int) else
                     f"| {name} | - | - | {dim:,} | {a['triggered_success']:.0%} | {a['control_success']:.0%} | "
                     f"{rc} | {au} | {hw} |")
    return lines


def _fine_tune_cells(cells: list[tuple[str, CellRecord]]) -> list[str]:
    """The fine-tunes as the cells they ran as (``InfluenceRecord.fine_tunes``): each phase's wall time and
    peak RSS, and the median step. Records kept before the fine-tunes were cells have none."""
    if not cells:
        return []
    lines = ["", "## The fine-tunes, as cells", "",
             "Each fine-tune ran as a cell of task `alpaca` (a re-run that reused its result shows the first "
             "run's). Peak RSS per phase (the model's load, the mask, the training steps):", "",
             "| fine-tune | method | steps | median step | load | mask | train |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, cell in cells:
        step = cell.metrics.step_s.median if cell.metrics.step_s else None
        peaks = [cell.phase(p).peak_rss_mib for p in ("load", "mask", "train")]
        lines.append(f"| {name} | {cell.config.get('method')} | {cell.metrics.get('steps_done')} | "
                     f"{'-' if step is None else f'{step:.2f} s'} | "
                     + " | ".join("-" if p is None else f"{p:,.0f} MiB" for p in peaks) + " |")
    return lines


def render_influence_report(record: InfluenceRecord, out_md: Path, where: str = "influence record") -> Path:
    """Render ``record`` (``where``: its file and line, for an error) to ``out_md`` and its plots folder. The
    record's sections are free-form results that the text and the plots read as they are: a missing or
    mistyped field is one line naming the record and the field, found before anything is written (the text
    and the plots are made in memory first, and only the files zobench wrote are replaced: ``report.owned``)."""
    out_md = Path(out_md)
    folder = plots_folder(out_md)
    linked = replaceable_plots(out_md, folder)
    for name in PLOT_NAMES:
        check_plot(folder / name, linked)
    try:
        drawn = draw_plots(record)
        text = render_influence(record, [(cap, f"{folder.name}/{name}") for cap, name, _ in drawn])
    except KeyError as e:
        raise UserError(f"{where}: no field {shown(e.args[0])} where the report reads one") from None
    except (TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise UserError(f"{where}: a field the report reads is not what it expects "
                        f"({type(e).__name__}: {one_line(str(e), 160)})") from None
    folder.mkdir(parents=True, exist_ok=True)
    for _, name, data in drawn:
        atomic_write(folder / name, data, "plot")
    return atomic_write(out_md, text, "report")
