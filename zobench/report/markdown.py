"""Records -> markdown text. Pure: the same records give the same bytes (no clock, no environment).

Every table is a list of columns, each a header and a function from a record to its cell text, so the
tables share one formatter and a missing value always renders as "-".
"""

from __future__ import annotations

import math
from typing import Callable

from zobench.analysis.design import half_width_95
from zobench.measure.load import LOADED_CPUS
from zobench.report.cells import (
    EXTRA_ORDER,
    PHASES,
    axis_value,
    density,
    get,
    is_cuda,
    is_sparse,
    is_zo,
    meaningful,
    method,
    pct,
    phase_peak,
    quant,
    setting,
    varying_axes,
)
from zobench.results import TRAIN_PHASES

Column = tuple[str, Callable[[dict], str]]
DASH = "-"


# -- numbers -------------------------------------------------------------------------------------------

def num(v) -> str:
    """Times and rates: about three significant digits, without switching to exponents."""
    if not isinstance(v, (int, float)):
        return DASH
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def mib(v) -> str:
    return f"{v:.0f}" if isinstance(v, (int, float)) else DASH


def size_mib(nbytes) -> str:
    return f"{nbytes / 2**20:.2f}" if isinstance(nbytes, (int, float)) else DASH


def ratio(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else DASH


SMOKE_STEPS = 100  # below this many steps a report calls its accuracies a smoke check


def step_ratio(r: dict) -> str:
    """A step over two forwards with the spread of its pairs; below 1.00 (impossible: a step makes two
    forwards) it is the limit read through noise, or a measurement fault, never a figure."""
    v, lo, hi = (get(r, f"derived.step_over_two_forwards{k}") for k in ("", "_p10", "_p90"))
    flag = get(r, "derived.step_timing")
    if flag == "fault":
        return f"fault ({v:.2f}, {lo:.2f}-{hi:.2f})"
    if flag == "at limit":
        return f"1.00 at limit ({v:.2f}, {lo:.2f}-{hi:.2f})"
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return f"{v:.2f} ({lo:.2f}-{hi:.2f})"
    return ratio(v)


def sci(v) -> str:
    return f"{v:.3g}" if isinstance(v, (int, float)) else DASH


def count(v) -> str:
    """Parameter counts: 1234 -> 1.23k, 134515008 -> 135M."""
    if not isinstance(v, (int, float)):
        return DASH
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def scores(d: dict | None) -> str:
    """Accuracy as a percent; generative tasks as EM/F1 percents."""
    if not d:
        return DASH
    if "accuracy" in d:
        return f"{d['accuracy'] * 100:.1f}"
    return "/".join(f"{d[k] * 100:.1f}" if isinstance(d.get(k), (int, float)) else DASH for k in ("em", "f1"))


def step_ms(rec: dict) -> str:
    s = get(rec, "metrics.step_s") or {}
    if not isinstance(s.get("median"), (int, float)):
        return DASH
    spread = f" ({num(s['p10'] * 1000)}-{num(s['p90'] * 1000)})" if "p10" in s and "p90" in s else ""
    return num(s["median"] * 1000) + spread


def at_best(rec: dict) -> str:
    best, step = get(rec, "metrics.test_best"), get(rec, "metrics.best_step")
    return f"{scores(best)} ({step})" if best and meaningful(rec) else DASH


def accuracy(rec: dict) -> str:
    if not meaningful(rec):
        return "n/a"
    before, after = get(rec, "metrics.test_before"), get(rec, "metrics.test_after")
    if not before and not after:
        return DASH
    return f"{scores(before)} -> {scores(after)}"


def one_line(text, limit: int = 300) -> str:
    line = " ".join(str(text or DASH).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


# -- tables --------------------------------------------------------------------------------------------

def escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def key_columns(extras: list[str]) -> list[Column]:
    """The columns that name a cell, in the rows' sort order: varying model/task/dtype, then method, quant,
    density, then any other varying axis (lr, ...), so that rows differing only in lr sit together."""
    def axis(a: str) -> Column:
        return a, lambda r: axis_value(r, a)

    outer = [axis(a) for a in extras if a in EXTRA_ORDER]
    inner = [axis(a) for a in extras if a not in EXTRA_ORDER]
    return outer + [("method", method), ("quant", lambda r: str(setting(r, "quant") or "none")),
                    ("density", lambda r: pct(density(r)))] + inner


def table(columns: list[Column], recs: list[dict], n_left: int) -> list[str]:
    """A markdown table, the first ``n_left`` columns left-aligned (names), the rest right (numbers)."""
    if not recs:
        return []
    head = "| " + " | ".join(escape(h) for h, _ in columns) + " |"
    rule = "|" + "|".join(":---" if i < n_left else "---:" for i in range(len(columns))) + "|"
    rows = ["| " + " | ".join(escape(fn(r)) for _, fn in columns) + " |" for r in recs]
    return [head, rule, *rows, ""]


def section(title: str, intro: str, columns: list[Column], recs: list[dict], extras: list[str],
            n_text: int = 0) -> list[str]:
    """A titled table of ``recs``: the cell's name columns, then ``columns`` (the first ``n_text`` text)."""
    keys = key_columns(extras)
    body = table(keys + columns, recs, len(keys) + n_text)
    return [f"## {title}", "", intro, "", *body] if body else []


# -- sections ------------------------------------------------------------------------------------------

def header(recs: list[dict], title: str | None, pilots: list[dict] = ()) -> list[str]:
    suite = next((r["suite"] for r in [*recs, *pilots] if r.get("suite")), None)
    ok = sum(r.get("status") == "ok" for r in recs)
    by_status = {}
    for r in recs:
        by_status[r.get("status", "?")] = by_status.get(r.get("status", "?"), 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items(), key=lambda kv: (kv[0] != "ok", kv[0])))
    models = sorted({str(setting(r, "model")) for r in recs})
    devices = sorted({str(r.get("device") or setting(r, "device")) for r in recs})
    finished = max((str(r["finished_at"]) for r in recs if r.get("finished_at")), default=None)
    lines = [f"# {title or 'zobench report: ' + (suite or 'results')}", ""]
    context = [f"Suite **{suite or '?'}**", f"model {', '.join(models)}" if recs else "",
               f"device {', '.join(devices)}" if recs else "", f"{len(recs)} cells ({tally})" if recs else "no cells"]
    if finished:
        context.append(f"finished {finished}")
    lines += ["; ".join(c for c in context if c) + ".", ""]
    spent = [sum(r.get("wall_s") or 0 for r in group) for group in (pilots, recs)]
    if pilots and any(spent):  # what choosing the learning rates cost, beside what the cells cost
        lines += [f"Machine time, from the records' wall clocks: {len(pilots)} lr pilot cells "
                  f"{spent[0] / 3600:.1f} h, {len(recs)} cells {spent[1] / 3600:.1f} h.", ""]
    env = next((r["env"] for r in recs if r.get("env")), None)
    git = next((r["git"] for r in recs if r.get("git")), None)
    if env or git:
        lines += [f"Environment: {environment(env or {}, git or {})}.", ""]
    random_weights = sum(not meaningful(r) for r in recs if r.get("status") == "ok")
    if random_weights:
        lines += [f"> {random_weights} of {ok} ok cells use random weights (`accuracy_meaningful: false`): "
                  "they measure memory and latency only; their accuracy columns show n/a.", ""]
    loaded = [r for r in recs if (get(r, "phases.train.other_cpus") or 0) >= LOADED_CPUS]
    if loaded:
        worst = max(get(r, "phases.train.other_cpus") for r in loaded)
        names = f" ({', '.join(short_name(r) for r in loaded)})" if len(loaded) <= 6 else ""
        its = "its" if len(loaded) == 1 else "their"
        lines += [f"> {cells(len(loaded))}{names} trained beside other work on the machine (at least "
                  f"{LOADED_CPUS} CPUs busy elsewhere on average, up to {worst:.2f}): {its} timings are slower "
                  "than on an idle machine; see `other CPUs` in the step breakdown.", ""]
    resumed = [r for r in recs if get(r, "metrics.resumed_from_step")]
    if resumed:
        were = "cell was" if len(resumed) == 1 else "cells were"
        lines += [f"> {len(resumed)} {were} killed part-way and resumed from a checkpoint (steps "
                  f"{', '.join(str(get(r, 'metrics.resumed_from_step')) for r in resumed)}): their results "
                  "equal an uninterrupted run's; their step timings span processes, the environment shown "
                  "is the last one's.", ""]
    for key, what in (("model_fallback_reason", "{} loaded the fallback model"), ("data_note", "data of {}")):
        for note in sorted({one_line(r[key]) for r in recs if r.get(key)}):
            n = sum(one_line(r.get(key)) == note for r in recs)
            lines += [f"> {what.format(cells(n))}: {escape(note)}", ""]
    return lines


def cells(n: int) -> str:
    return "1 cell" if n == 1 else f"{n} cells"


def short_name(rec: dict) -> str:
    """A cell in a few words for a note: its method, its quantization when any, its seed."""
    cfg = rec.get("config") or {}
    quant = cfg.get("quant")
    return " ".join([str(cfg.get("method", "?"))] + ([str(quant)] if quant not in (None, "none") else [])
                    + [f"seed {cfg.get('seed', 0)}"])


def environment(env: dict, git: dict) -> str:
    parts = [", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())]
    if env.get("python"):
        parts.append(f"Python {env['python']}")
    if env.get("cpu"):
        parts.append(f"CPU {env['cpu']} ({env.get('cpu_count', '?')} cores, "
                     f"{env.get('torch_threads', '?')} torch threads)")
    if env.get("gpu"):
        gpu = f"GPU {env['gpu']}" + (f" x{env['gpu_count']}" if env.get("gpu_count", 1) > 1 else "")
        parts.append(gpu + (f", CUDA {env['cuda']}" if env.get("cuda") else ""))
    if env.get("malloc_mmap_threshold"):
        parts.append(f"MALLOC_MMAP_THRESHOLD_={env['malloc_mmap_threshold']}")
    if git.get("commit"):
        parts.append(f"git {str(git['commit'])[:12]}" + (" (dirty)" if git.get("dirty") else ""))
    return "; ".join(p for p in parts if p)


def main_table(ok: list[dict], extras: list[str]) -> list[str]:
    cols: list[Column] = [
        ("density obtained", lambda r: pct(get(r, "metrics.density_obtained"))),
        ("trainable", lambda r: count(get(r, "metrics.trainable_numel"))),
        ("peak MiB", lambda r: mib(get(r, "derived.peak_mib"))),
        ("est. peak MiB", lambda r: mib(get(r, "estimate.peak_mib"))),
        ("peak / inference", lambda r: ratio(get(r, "derived.peak_over_inference"))),
        ("step ms (p10-p90)", step_ms),
        ("step / 2 fwd (p10-p90)", lambda r: DASH if get(r, "config.method") == "forward"  # the reference
         else step_ratio(r)),
        ("speedup vs full", lambda r: ratio(get(r, "derived.speedup_vs_full"))),
        *([("kept (MiB)", lambda r: size_mib(get(r, "artifact.bytes")))] if any(get(r, "artifact") for r in ok)
          else []),
        ("tokens/s", lambda r: num(get(r, "metrics.tokens_per_s"))),
        ("test % before -> after", accuracy),
        *([("test % at best dev (step)", at_best)] if any(get(r, "metrics.test_best") for r in ok) else []),
        ("final loss", lambda r: f"{v:.4f}" if isinstance(v := get(r, "metrics.final_loss"), (int, float))
         else DASH),
    ]
    intro = ("Peak memory is the training peak (on a GPU the device memory the driver reported, else CUDA "
             "max allocated; on a CPU peak RSS). Peak / "
             "inference is against the `forward` reference cell (inference only, same batches); step / 2 fwd "
             "is the median, with p10-p90, of each timed step over two of the cell's own inference forwards of "
             "the same batch, timed right after it in the same process (dense-and-sparse layers bypassed, so "
             "the plain quantized model); a step cannot cost less than its two forwards, so a median below "
             "1.00 is shown as the limit where its spread reaches 1.00 and as a measurement fault where it "
             "does not; records without such pairs use the forward cell. Speedup is against the full-ZO cell "
             "of the same model, dtype, quant and task. Test scores are accuracy %, or EM/F1 % for generative tasks.")
    steps = [get(r, "config.steps") for r in ok if get(r, "config.method") != "forward"]
    if steps and all(isinstance(n, int) and n < SMOKE_STEPS for n in steps):
        intro += (f" Accuracy after {max(steps)} steps is a smoke check (the cells train and score), not a "
                  "measure of learning: ZO needs hundreds of steps to move it; `suites/claims-v2.yaml` "
                  "measures learning, with intervals.")
    return section("Results", intro, cols, ok, extras)


def quant_table(ok: list[dict], extras: list[str]) -> list[str]:
    """Each quantized cell beside the unquantized cell of the same method (and other settings)."""
    if len({quant(r) for r in ok}) < 2:
        return []

    def twin_key(r):  # an lr chosen by the pilot is the method's own on each side, not a setting to match
        return tuple(str(setting(r, a)) for a in ("model", "task", "dtype", "method", "density", *extras)
                     if a != "quant" and not (a == "lr" and get(r, "lr_choice")))

    float_cells = {twin_key(r): r for r in ok if quant(r) == "none"}

    def vs_float(path: str, fn):
        def cell(r):
            twin, value = float_cells.get(twin_key(r)), get(r, path)
            other = get(twin, path) if twin else None
            return fn(value, other) if isinstance(value, (int, float)) and isinstance(other, (int, float)) else DASH
        return cell

    def score(r):
        return get(r, "metrics.test_after.accuracy") if meaningful(r) else None

    cols: list[Column] = [
        ("peak MiB", lambda r: mib(get(r, "derived.peak_mib"))),
        ("peak / float", vs_float("derived.peak_mib", lambda a, b: ratio(a / b))),
        ("weights MiB (est.)", lambda r: mib(get(r, "estimate.breakdown.weights_mib"))),
        ("step / float", vs_float("metrics.step_s.median", lambda a, b: ratio(a / b))),
        ("test % after", lambda r: pct_points(score(r))),
        ("vs float (points)", lambda r: signed_points(score(r), score(float_cells.get(twin_key(r)) or {}))),
    ]
    intro = ("Memory against accuracy per quant backend: each quantized cell beside the unquantized (`none`) "
             "cell of the same method. Quantized sparse cells train their masked values in 16/32-bit beside "
             "the quantized layers (dense-and-sparse).")
    return section("Quantization trade-off", intro, cols, [r for r in ok if quant(r) != "none"], extras)


def pct_points(v) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) else DASH


def signed_points(a, b) -> str:
    return f"{100 * (a - b):+.1f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else DASH


def phase_table(ok: list[dict], extras: list[str]) -> list[str]:
    present = [p for p in PHASES if any(p in (r.get("phases") or {}) for r in ok)]

    def cell(r, p):
        peak, secs = phase_peak(r, p), get(r, f"phases.{p}.wall_s")
        return DASH if peak is None and secs is None else f"{mib(peak)} / {num(secs)} s"

    def whole(r):
        peak, where = get(r, "derived.cell_peak_mib"), get(r, "derived.cell_peak_phase")
        return DASH if peak is None else f"{mib(peak)} ({where})"

    cols: list[Column] = [(p, lambda r, p=p: cell(r, p)) for p in present] + [("whole cell MiB (phase)", whole)]
    intro = ("Peak MiB / seconds of each phase; the peak is reset at the start of each phase (on a GPU the "
             "device memory the driver reported, else CUDA max allocated; on a CPU peak RSS). The whole cell's "
             "peak is the largest phase's: what a machine must hold to run the cell, and what `peak_mib_max` "
             "holds unless its budget names phases.")
    return section("Memory by phase", intro, cols, ok, extras)


def gpu_memory_table(ok: list[dict], extras: list[str]) -> list[str]:
    """On a GPU, the three views of the training peak side by side, and the estimate beside them."""
    cuda = [r for r in ok if is_cuda(r)]
    if not cuda:
        return []

    def peak(r, key):
        vals = [get(r, f"phases.{p}.{key}") for p in TRAIN_PHASES]
        vals = [v for v in vals if isinstance(v, (int, float))]
        return max(vals) if vals else None

    def source(r):
        return get(r, "phases.train.device_source") or get(r, "phases.warmup.device_source") or DASH

    cols: list[Column] = [
        ("device MiB", lambda r: mib(peak(r, "device_peak_mib"))),
        ("measured as", source),
        ("max allocated MiB", lambda r: mib(peak(r, "cuda_max_allocated_mib"))),
        ("max reserved MiB", lambda r: mib(peak(r, "cuda_max_reserved_mib"))),
        ("est. MiB", lambda r: mib(get(r, "estimate.peak_mib"))),
        ("est. floor", lambda r: get(r, "estimate.calibration.source") or DASH),
    ]
    intro = ("Training peak (warm-up and train phases) three ways: what the driver reported (NVML: the process's "
             "own use where the driver reports processes, else the device's use above its level before the "
             "cell; context, libraries and allocator slack included, what an 8 GiB card must hold), the "
             "allocator's max allocated tensors, and its max reserved blocks. The estimate predicts the "
             "device figure; its floor was measured on this GPU (measured) or not (default).")
    return section("GPU memory", intro, cols, cuda, extras)


def step_table(ok: list[dict], extras: list[str]) -> list[str]:
    parts = ("perturb", "forward_plus", "forward_minus", "forward", "backward", "update")
    timed = [r for r in ok if get(r, "metrics.step_parts_s")]
    present = [p for p in parts if any(get(r, f"metrics.step_parts_s.{p}") for r in timed)]
    cols: list[Column] = [(p, lambda r, p=p: num(ms(get(r, f"metrics.step_parts_s.{p}.median")))) for p in present]
    cols.append(("step", lambda r: num(ms(get(r, "metrics.step_s.median")))))
    intro = "Median milliseconds of each part of a training step (a ZO step perturbs twice per direction)."
    if any(get(r, "metrics.zo_passes") for r in timed):
        def passes(r):
            gb, x = get(r, "metrics.zo_passes.pass_gb_s"), get(r, "metrics.zo_passes.pass_over_copy")
            paths = "+".join(sorted(get(r, "metrics.zo_passes.paths") or {})) or DASH
            return DASH if gb is None else f"{gb:.1f} ({x:.2f}) {paths}" if x is not None else f"{gb:.1f} {paths}"
        cols.append(("ZO passes GB/s (x copy), kernel", passes))
        intro += (" ZO passes: bytes the cell's passes over its trainable values read and wrote, over their "
                  "seconds, beside a plain copy of the model's weights measured in the same process, and the "
                  "kernel that ran them (c-openmp: the fused Philox kernel; torch: its fallback).")
    if any(get(r, "phases.train.other_cpus") is not None for r in timed):
        cols.append(("other CPUs", lambda r: num(get(r, "phases.train.other_cpus"))))
        intro += (" Other CPUs: the average number of CPUs busy with other work on the machine while the cell "
                  "trained (0 on an idle machine); timings beside other work are slower than the cell alone.")
    return section("Step breakdown (ms)", intro, cols, timed, extras)


def ms(seconds):
    return seconds * 1000 if isinstance(seconds, (int, float)) else None


def mask_tables(ok: list[dict], extras: list[str]) -> list[str]:
    hit = {True: "yes", False: "no"}
    mask_cols: list[Column] = [
        ("density obtained", lambda r: pct(get(r, "metrics.density_obtained"))),
        ("nnz", lambda r: count(get(r, "metrics.mask_nnz"))),
        ("sq-grad mass", lambda r: pct(get(r, "metrics.sqgrad_mass_frac"))),
        ("build s", lambda r: num(get(r, "metrics.mask_build_s"))),
        ("cache hit", lambda r: hit.get(get(r, "metrics.mask_cache_hit"), DASH)),
        ("mask phase peak MiB", lambda r: mib(phase_peak(r, "mask"))),
    ]
    intro = ("Sq-grad mass: the fraction of the calibration squared-gradient mass the mask covers "
             "(sensitive masks maximise it).")
    drift_cols: list[Column] = [
        ("fraction changed", lambda r: sci(get(r, "metrics.restore_drift_frac_changed"))),
        ("max abs drift", lambda r: sci(get(r, "metrics.restore_drift_max_abs"))),
    ]
    drifted = [r for r in ok if is_zo(r) and (get(r, "metrics.restore_drift_frac_changed") is not None
                                                      or get(r, "metrics.restore_drift_max_abs") is not None)]
    drift_intro = ("After +eps then -eps, the fraction of trainable values not restored bit-exactly and the "
                   "largest difference (0 means an exact restore).")
    return (section("Masks", intro, mask_cols, [r for r in ok if is_sparse(r)], extras)
            + section("Restore drift", drift_intro, drift_cols, drifted, extras))


def lr_table(ok: list[dict], pilots: list[dict], extras: list[str]) -> list[str]:
    chosen = [r for r in ok if get(r, "lr_choice")]
    if not chosen:
        return []

    def tried(r):
        c = r["lr_choice"]
        return ", ".join(f"{lr:g}: {pct_points(d) if d is not None else 'failed'}"
                         for lr, d in zip(c["grid"], c["dev"]))

    cols: list[Column] = [("lr: dev % after the pilot", tried),
                          ("chosen lr", lambda r: f"{r['lr_choice']['chosen']:g}{lr_caveat(r['lr_choice'])}"
                           if r["lr_choice"].get("chosen") else "none (kept the configured lr)"),
                          ("the run's dev %: best (step) -> last (step)", run_dev),
                          ("the run's training loss", loss_rise)]
    steps = chosen[0]["lr_choice"]["pilot_steps"]
    intro = (f"Each cell's learning rate was chosen on dev, never on test: every lr of its grid ran "
             f"{steps} steps ({len(pilots)} pilot cells), and the cell ran with the lr of the best dev score "
             f"(ties: the smaller lr). A choice at the grid's edge may have a better lr outside the grid; "
             f"where dev did not move across the grid the choice says nothing. The last column is the cell's own "
             f"run: a pilot of a few steps can choose an lr that diverges over many more, which shows as dev "
             f"falling or as the training loss rising above its start (the mean loss of the run's first tenth "
             f"against each later tenth's, beyond twice the noise of the difference).")
    return section("Learning rates chosen on dev", intro, cols, chosen, extras, n_text=2)


def run_dev(rec: dict) -> str:
    """The cell's own dev curve after the pilot: its best and its last point, and whether it fell by more
    than the dev set's noise (a 95% binomial half-width at the best score): a pilot of a few steps can pick
    an lr that diverges over the whole run."""
    curve = [p for p in get(rec, "metrics.dev_curve") or [] if p.get("accuracy") is not None]
    if not curve:
        return "-"
    best = max(curve, key=lambda p: (p["accuracy"], -p["step"]))
    last = curve[-1]
    text = f"{pct_points(best['accuracy'])} ({best['step']}) -> {pct_points(last['accuracy'])} ({last['step']})"
    n, acc = get(rec, "metrics.n_dev"), best["accuracy"]
    if n and acc - last["accuracy"] > half_width_95(acc, n):
        text += " (fell by more than dev noise)"
    return text


def loss_rise(rec: dict, parts: int = 10) -> str:
    """The training loss over the run in tenths: its first tenth's mean, its last tenth's, and the highest later
    tenth when that rose above the first by more than twice the standard error of the difference (the first
    tenth's per-step spread): the lr is too large for some stretch of the run."""
    losses = [x for x in get(rec, "metrics.loss_curve") or [] if isinstance(x, (int, float)) and math.isfinite(x)]
    if len(losses) < 2 * parts:
        return "-"
    k = len(losses) // parts
    means = [sum(losses[i * k:(i + 1) * k]) / k for i in range(parts)]
    first = losses[:k]
    sd = math.sqrt(sum((x - means[0]) ** 2 for x in first) / (k - 1))
    text = f"{means[0]:.2f} -> {means[-1]:.2f}"
    worst = max(range(1, parts), key=lambda i: means[i])
    if means[worst] - means[0] > 2 * math.sqrt(2) * sd / math.sqrt(k):
        steps = get(rec, "metrics.steps_done") or len(losses)
        lo, hi = round(steps * worst / parts) + 1, round(steps * (worst + 1) / parts)
        text += f" (rose above its start: {means[worst]:.2f} at steps {lo}-{hi})"
    return text


def lr_caveat(choice: dict) -> str:
    """What the pilot could not tell: dev equal at every lr, or the best lr at an end of the grid."""
    scores = [d for d in choice.get("dev") or [] if d is not None]
    grid = choice.get("grid") or []
    if len(grid) < 2 or not scores:
        return ""
    if len(scores) == len(grid) and max(scores) == min(scores):
        return " (dev equal at every lr)"
    if choice.get("chosen") in (min(grid), max(grid)):
        return " (grid edge)"
    return ""


def pilot_progress(ok: list[dict], pilots: list[dict]) -> list[str]:
    """While the lr pilot runs (no cell has its lr yet): each finished pilot cell and its dev score."""
    if not pilots or any(get(r, "lr_choice") for r in ok):
        return []
    cols: list[Column] = [("lr", lambda r: f"{setting(r, 'lr'):g}"),
                          ("dev % after the pilot", lambda r: pct_points(get(r, "metrics.best_dev.accuracy"))
                           if r.get("status") == "ok" else str(r.get("status"))),
                          ("steps", lambda r: str(setting(r, "steps"))),
                          ("wall s", lambda r: f"{r['wall_s']:.0f}" if r.get("wall_s") else "-")]
    intro = (f"The learning-rate pilot is running: {len(pilots)} pilot cells have finished. Each tries one lr "
             f"of its method's grid on dev (never on test); the cells run once every pilot of their grid is done.")
    extras = [a for a in varying_axes(pilots) if a != "lr"]
    return section("Learning-rate pilot (in progress)", intro, cols, pilots, extras, n_text=1)


def failure_table(bad: list[dict], extras: list[str]) -> list[str]:
    cols: list[Column] = [("status", lambda r: str(r.get("status"))), ("reason", lambda r: one_line(r.get("reason")))]
    return section("Failed and unsupported cells", "Cells without results, with the recorded reason.",
                   cols, bad, extras, n_text=2)


def plot_links(plots: list[tuple[str, str]]) -> list[str]:
    if not plots:
        return []
    lines = ["## Plots", ""]
    for caption, rel in plots:
        lines += [f"### {caption}", "", f"![{caption}]({rel})", ""] if rel else [caption, ""]
    return lines


def render_markdown(recs: list[dict], title: str | None, plots: list[tuple[str, str]],
                    pilots: list[dict] | None = None, claims=None) -> str:
    """``recs``: one record per cell, in report order; ``plots``: (caption, path relative to the file);
    ``pilots``: the learning-rate pilot's cells; ``claims``: the claims section's lines (``report.claims``)."""
    extras = varying_axes(recs)
    ok = [r for r in recs if r.get("status") == "ok"]
    bad = [r for r in recs if r.get("status") != "ok"]
    lines = header(recs, title, pilots or []) + (claims or [])
    for part in (main_table, quant_table, phase_table, gpu_memory_table, step_table, mask_tables):
        lines += part(ok, extras)
    lines += lr_table(ok, pilots or [], extras) + pilot_progress(ok, pilots or [])
    lines += failure_table(bad, extras) + plot_links(plots)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"
