"""The report's measurement tables: results, over seeds, memory by phase, GPU memory, the
step breakdown, masks and restore drift, and the cells without results."""

from __future__ import annotations

import statistics

from zobench.measure.machine import machine_name
from zobench.report.cells import (
    PHASES,
    CellView,
    configs,
    is_cuda,
    is_sparse,
    is_zo,
    meaningful,
    median,
    method_info,
    pct,
    phase_peak,
    primary_score,
    varying_axes,
)
from zobench.report.table import (
    DASH,
    Column,
    count,
    mib,
    ms,
    num,
    one_line,
    ratio,
    sci,
    scores,
    section,
    size_mib,
)
from zobench.results import TRAIN_PHASES
from zobench.spec.claims import finite_number

SMOKE_STEPS = 100  # below this many steps a report calls its accuracies a smoke check


def step_ratio(r: CellView) -> str:
    """A step over two forwards with the spread of its pairs; below 1.00 (impossible: a step makes two
    forwards) it is the limit read through noise, or a measurement fault, never a figure."""
    d = r.derived
    v, lo, hi = d.step_over_two_forwards, d.step_over_two_forwards_p10, d.step_over_two_forwards_p90
    if d.step_timing == "fault":
        return f"fault ({v:.2f}, {lo:.2f}-{hi:.2f})"
    if d.step_timing == "at limit":
        return f"1.00 at limit ({v:.2f}, {lo:.2f}-{hi:.2f})"
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return f"{v:.2f} ({lo:.2f}-{hi:.2f})"
    return ratio(v)


def step_ms(rec: CellView) -> str:
    s = rec.metrics.step_s
    if s is None or not isinstance(s.median, (int, float)):
        return DASH
    return num(s.median * 1000) + f" ({num(s.p10 * 1000)}-{num(s.p90 * 1000)})"


def at_best(rec: CellView) -> str:
    best, step = rec.metrics.get("test_best"), rec.metrics.get("best_step")
    return f"{scores(best)} ({step})" if best and meaningful(rec) else DASH


def before_after(rec: CellView) -> str:
    if not meaningful(rec):
        return "n/a"
    before, after = rec.metrics.get("test_before"), rec.metrics.get("test_after")
    if not before and not after:
        return DASH
    return f"{scores(before)} -> {scores(after)}"


def main_table(ok: list[CellView], extras: list[str]) -> list[str]:
    cols: list[Column] = [
        ("density obtained", lambda r: pct(r.metrics.get("density_obtained"))),
        ("trainable", lambda r: count(r.metrics.get("trainable_numel"))),
        ("peak MiB", lambda r: mib(r.derived.peak_mib)),
        ("est. peak MiB", lambda r: mib(r.estimated_peak_mib)),
        ("peak / inference", lambda r: ratio(r.derived.peak_over_inference)),
        ("step ms (p10-p90)", step_ms),
        ("step / 2 fwd (p10-p90)", lambda r: DASH if r.config.get("method") == "forward"  # the reference
         else step_ratio(r)),
        ("speedup vs full", lambda r: ratio(r.derived.speedup_vs_full) +
         (" s" if r.derived.speedup_clock == "seconds" and r.method != "full" else "")),
        *([("kept (MiB)", lambda r: size_mib(r.artifact_bytes))] if any(r.artifact for r in ok) else []),
        ("tokens/s", lambda r: num(r.metrics.throughput())),
        ("test % before -> after", before_after),
        *([("test % at best dev (step)", at_best)] if any(r.metrics.get("test_best") for r in ok) else []),
        ("final loss", lambda r: f"{v:.4f}" if isinstance(v := r.metrics.get("final_loss"), (int, float))
         else DASH),
    ]
    intro = ("Peak memory is the training peak (on a GPU the device memory the driver reported, else CUDA "
             "max allocated; on a CPU peak RSS). Peak / "
             "inference is against the `forward` reference cell (inference only, same batches); step / 2 fwd "
             "is the median, with p10-p90, of each timed step over twice one of the cell's own inference forwards "
             "of the same batch, timed right after it in the same process (so a pair's spread holds one "
             "forward's noise, doubled) (dense-and-sparse layers bypassed, so "
             "the plain quantized model); a step cannot cost less than its two forwards, so a median below "
             "1.00 is shown as the limit where its spread reaches 1.00 and as a measurement fault where it "
             "does not; records without such pairs use the forward cell. Speedup is against the full-ZO cell "
             "of the same model, dtype, quant and task, in reference forwards where both cells have the pairs "
             "(full's step / 2 fwd over this cell's, so load that slowed one cell's steps and forwards alike "
             "cancels), else in seconds (marked s). Tokens/s is a typical step's: the mean step's input tokens "
             "over the median step's seconds. Test scores are accuracy %, or EM/F1 % for generative tasks.")
    steps = [r.config.get("steps") for r in ok if r.config.get("method") != "forward"]
    if steps and all(isinstance(n, int) and n < SMOKE_STEPS for n in steps):
        intro += (f" Accuracy after {max(steps)} steps is a smoke check (the cells train and score), not a "
                  "measure of learning: ZO needs hundreds of steps to move it; `suites/claims-v2.yaml` "
                  "measures learning, with intervals.")
    return section("Results", intro, cols, ok, extras)


def limit_ratio(v: float) -> str:
    """A step over two forwards pooled over seeds: below 1.00 (a step makes two forwards) it is the limit
    read through noise, as the results table says it."""
    return f"1.00 at limit ({v:.2f})" if v < 1 else ratio(v)


def seeds_table(ok: list[CellView], extras: list[str]) -> list[str]:
    """One row a configuration with its seeds pooled, where a suite runs some with several: what the plots
    draw, in numbers. Descriptive: the claims, where a suite declares them, decide differences."""
    if "seed" not in extras:
        return []
    groups = configs(ok, extras)
    if all(len(g) == 1 for g in groups.values()):
        return []
    runs = {id(g[0]): g for g in groups.values()}

    def values(r: CellView, value_of) -> list[float]:
        return [v for c in runs[id(r)] if isinstance(v := value_of(c), (int, float))]

    def score_of(key):
        return lambda c: primary_score(c.metrics.get(key)) if meaningful(c) else None

    def spread_pct(r: CellView) -> str:
        v = values(r, score_of("test_best")) or values(r, score_of("test_after"))
        if not v:
            return DASH
        mean = statistics.fmean(v)
        sd = statistics.stdev(v) if len(v) > 1 else None
        return (f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")
                + (f" ({100 * min(v):.1f}-{100 * max(v):.1f})" if len(v) > 1 else ""))

    def med(value_of, fmt, with_range: bool = False):
        def cell(r: CellView) -> str:
            v = values(r, value_of)
            if not v:
                return DASH
            text = fmt(statistics.median(v))
            return text + (f" ({fmt(min(v))}-{fmt(max(v))})" if with_range and len(v) > 1 else "")
        return cell

    scored = "at best dev" if any(c.metrics.get("test_best") for c in ok) else "after training"
    cols: list[Column] = [
        ("seeds", lambda r: str(len(runs[id(r)]))),
        (f"test % {scored}, mean ± sd (min-max)", spread_pct),
        ("peak MiB, median (min-max)", med(lambda c: c.derived.peak_mib, mib, with_range=True)),
        ("peak / inference, median", med(lambda c: c.derived.peak_over_inference, ratio)),
        ("step / 2 fwd, median", med(lambda c: None if c.config.get("method") == "forward"
                                     else c.derived.step_over_two_forwards, limit_ratio)),
        ("step ms, median", med(lambda c: ms(median(c.metrics.step_s)), num)),
    ]
    intro = ("Each configuration once, its seeds pooled (failed runs included: every recorded run is a "
             "seed): the mean test score with its standard deviation and range over seeds, and the medians "
             "over seeds of each run's peak and step figures (the plots draw the same). Descriptive: where the "
             "suite declares claims, the intervals above decide them.")
    if scored == "at best dev" and any(values(g[0], score_of("best_dev")) for g in groups.values()):
        def dev_mean(r: CellView) -> str:
            v = values(r, score_of("best_dev"))
            return f"{100 * statistics.fmean(v):.1f}" if v else DASH
        cols.insert(2, ("dev % at best, mean", dev_mean))
        intro += (" Dev % at best: the dev score at each run's best dev step, the step chosen on it, so it reads "
                  "high by selection; the test score beside it is that step's, which the choice did not see.")
    return section("Over seeds", intro, cols, [g[0] for g in groups.values()], [a for a in extras if a != "seed"])


def phase_table(ok: list[CellView], extras: list[str]) -> list[str]:
    present = [p for p in PHASES if any(p in r.phases for r in ok)]

    def cell(r, p):
        peak, secs, est = phase_peak(r, p), r.phase(p).wall_s, r.estimated_phase_mib(p)
        if peak is None and secs is None:
            return DASH
        if p == "mask" and r.mask_cached:  # read from the mask cache, not computed
            why = f"cached; est. {mib(est)} computed" if est is not None else "cached"
            return f"{mib(peak)} ({why}) / {num(secs)} s"
        return f"{mib(peak)}" + (f" (est. {mib(est)})" if est is not None else "") + f" / {num(secs)} s"

    def whole(r):
        peak, where = r.derived.cell_peak_mib, r.derived.cell_peak_phase
        return DASH if peak is None else f"{mib(peak)} ({where})"

    cols: list[Column] = [(p, lambda r, p=p: cell(r, p)) for p in present] + [("whole cell MiB (phase)", whole)]
    intro = ("Peak MiB (with the estimator's, where the record has one) / seconds of each phase; the peak is "
             "reset at the start of each phase (on a GPU the "
             "device memory the driver reported, else CUDA max allocated; on a CPU peak RSS). The whole cell's "
             "peak is the largest phase's: what a machine must hold to run the cell, and what `peak_mib_max` "
             "holds unless its budget names phases. A mask read from zobench's mask cache is marked cached: its "
             "phase did not compute it, and the estimate beside it is what computing it would take (the quantize "
             "phase after it is priced as after a cached mask).")
    return section("Memory by phase", intro, cols, ok, extras)


def host_phase_table(ok: list[CellView], extras: list[str]) -> list[str]:
    """On a GPU, each phase's host memory (peak RSS) beside its estimate: what the machine around the card
    must hold (a mask built block by block keeps every block's calibration inputs there)."""
    cuda = [r for r in ok if is_cuda(r)]
    present = [p for p in PHASES if any(r.phase(p).peak_rss_mib is not None for r in cuda)]
    if not cuda or not present:
        return []

    def cell(r, p):
        peak, est = r.phase(p).peak_rss_mib, r.estimated_host_mib(p)
        if peak is None:
            return DASH
        return f"{mib(peak)}" + (f" (est. {mib(est)})" if est is not None else "")

    def whole(r):
        peaks = [(r.phase(p).peak_rss_mib, p) for p in present if r.phase(p).peak_rss_mib is not None]
        if not peaks:
            return DASH
        peak, phase = max(peaks)
        return f"{mib(peak)} ({phase})"

    cols: list[Column] = [(p, lambda r, p=p: cell(r, p)) for p in present] + [("largest MiB (phase)", whole)]
    intro = ("Host memory of GPU cells: each phase's peak RSS in MiB, with the estimator's (the process's own "
             "floor on this node, or the H200's where it measured none, plus what the cell keeps in host "
             "memory: a mask built block by block keeps every block's input for every calibration sequence "
             "there). The machine around the card must hold the largest.")
    return section("Host memory by phase (GPU cells)", intro, cols, cuda, extras)


def gpu_memory_table(ok: list[CellView], extras: list[str]) -> list[str]:
    """On a GPU, the three views of the training peak side by side, and the estimate beside them."""
    cuda = [r for r in ok if is_cuda(r)]
    if not cuda:
        return []

    def peak(r, figure):
        vals = [figure(r.phase(p)) for p in TRAIN_PHASES]
        vals = [v for v in vals if isinstance(v, (int, float))]
        return max(vals) if vals else None

    def source(r):
        return r.phase("train").device_source or r.phase("warmup").device_source or DASH

    cols: list[Column] = [
        ("device MiB", lambda r: mib(peak(r, lambda m: m.device_peak_mib))),
        ("measured as", source),
        ("max allocated MiB", lambda r: mib(peak(r, lambda m: m.cuda_max_allocated_mib))),
        ("max reserved MiB", lambda r: mib(peak(r, lambda m: m.cuda_max_reserved_mib))),
        ("est. MiB", lambda r: mib(r.estimated_peak_mib)),
        ("est. floor", lambda r: r.estimate_floor or DASH),
    ]
    intro = ("Training peak (warm-up and train phases) three ways: what the driver reported (NVML: the process's "
             "own use where the driver reports processes, else the device's use above its level before the "
             "cell; context, libraries and allocator slack included, what an 8 GiB card must hold), the "
             "allocator's max allocated tensors, and its max reserved blocks. The estimate predicts the "
             "device figure; its floor was measured on this GPU (measured) or not (default).")
    return section("GPU memory", intro, cols, cuda, extras)


def step_table(ok: list[CellView], extras: list[str]) -> list[str]:
    parts = ("perturb", "forward_plus", "forward_minus", "forward", "backward", "update")
    timed = [r for r in ok if r.metrics.step_parts_s]
    present = [p for p in parts if any(p in r.metrics.step_parts_s for r in timed)]
    cols: list[Column] = [(p, lambda r, p=p: num(ms(median(r.metrics.step_parts_s.get(p))))) for p in present]
    cols.append(("step", lambda r: num(ms(median(r.metrics.step_s)))))
    intro = "Median milliseconds of each part of a training step (a ZO step perturbs twice per direction)."
    if any(r.metrics.get("zo_passes") for r in timed):
        def passes(r):
            zo = r.metrics.get("zo_passes") or {}
            gb, x = zo.get("pass_gb_s"), zo.get("pass_over_copy")
            paths = "+".join(sorted(zo.get("paths") or {})) or DASH
            return DASH if gb is None else f"{gb:.1f} ({x:.2f}) {paths}" if x is not None else f"{gb:.1f} {paths}"
        cols.append(("ZO passes GB/s (x copy), kernel", passes))
        intro += (" ZO passes: bytes the cell's passes over its trainable values read and wrote, over their "
                  "seconds, beside a plain copy of the model's weights measured in the same process, and the "
                  "kernel that ran them (c-openmp: the fused Philox kernel; torch: its fallback).")
    if any(r.phase("train").other_cpus is not None for r in timed):
        cols.append(("other CPUs", lambda r: num(r.phase("train").other_cpus)))
        intro += (" Other CPUs: the average number of CPUs busy with other work on the machine while the cell "
                  "trained (0 on an idle machine); timings beside other work are slower than the cell alone.")
    if any(r.metrics.get("shape_warmup") for r in timed):
        def warmed(r):  # a record is read as data: a malformed entry is a dash, not an error
            w = r.metrics.get("shape_warmup")
            n, secs = (w.get("shapes"), w.get("seconds")) if isinstance(w, dict) else (None, None)
            ok = isinstance(n, int) and isinstance(secs, (int, float)) and not isinstance(secs, bool)
            return f"{n} in {secs:.2f} s" if ok else DASH
        cols.append(("shapes warmed", warmed))
        intro += (" Shapes warmed: before its first step the cell ran one forward at each batch shape its steps "
                  "use, so that a device's one-time set-up for a new shape (cuDNN attention's plan for a new "
                  "sequence length on CUDA) is not timed as a step (`shape_warmup`).")
    if len({machine_name(r.env) for r in timed}) > 1:
        cols.append(("machine", lambda r: machine_name(r.env) or DASH))
        intro += (" Machine: where the cell ran; these cells ran on several, and a step's parts compare within "
                  "one (another CPU can speed the forwards and not a method's own passes).")
    return section("Step breakdown (ms)", intro, cols, timed, extras)


def mask_tables(ok: list[CellView], extras: list[str]) -> list[str]:
    hit = {True: "yes", False: "no"}
    mask_cols: list[Column] = [
        ("density obtained", lambda r: pct(r.metrics.get("density_obtained"))),
        ("nnz", lambda r: count(r.metrics.get("mask_nnz"))),
        ("sq-grad mass", lambda r: pct(r.metrics.get("sqgrad_mass_frac"))),
        ("build s", lambda r: num(r.metrics.get("mask_build_s"))),
        ("cache hit", lambda r: hit.get(r.metrics.get("mask_cache_hit"), DASH)),
        ("built", lambda r: r.metrics.get("mask_route") or DASH),
        ("mask phase peak MiB", lambda r: mib(phase_peak(r, "mask"))),
    ]
    intro = ("Sq-grad mass: the fraction of the calibration squared-gradient mass the mask covers "
             "(sensitive masks maximise it). Built: on the whole float model, or block by block on a streamed "
             "model that never holds it whole (the same mask: models.layerwise).")
    drift_cols: list[Column] = [
        ("moved by +eps", lambda r: pct(r.metrics.get("perturb_frac_changed"))),
        ("fraction changed", lambda r: sci(r.metrics.get("restore_drift_frac_changed"))),
        ("max abs drift", lambda r: sci(r.metrics.get("restore_drift_max_abs"))),
    ]
    drifted = [r for r in ok if is_zo(r) and (r.metrics.get("restore_drift_frac_changed") is not None
                                              or r.metrics.get("restore_drift_max_abs") is not None)]
    drift_intro = ("Moved by +eps: the share of trainable values a perturbation changed at all (below 100% where "
                   "eps is under the values' resolution: bfloat16 weights of 0.5 and above at eps 1e-3, or low-bit "
                   "codes, which a stochastic rounding moves a level with probability eps over the level's gap; "
                   "the two-point estimate then carries that rounding's noise). After +eps then -eps, the "
                   "fraction of trainable values not restored bit-exactly and the largest difference (0 means "
                   "an exact restore).")
    return (section("Masks", intro, mask_cols, [r for r in ok if is_sparse(r)], extras)
            + section("Restore drift", drift_intro, drift_cols, drifted, extras))


def projected_gradients(r: CellView) -> list[float]:
    """Every g a ZO record's trajectory keeps (after any clip; q of them a step), or [] where it keeps none or
    keeps something else: a record is read as data."""
    steps = r.metrics.get("trajectory")
    out: list[float] = []
    for step in steps if isinstance(steps, list) else []:
        for pair in step if isinstance(step, list) else []:
            g = pair[1] if isinstance(pair, (list, tuple)) and len(pair) == 2 else None
            if not finite_number(g):
                return []
            out.append(float(g))
    return out


def clip_table(ok: list[CellView], pilots: list[CellView]) -> list[str]:
    """Where a method clips the directional derivative (QZO's ``clip_threshold``): on how many steps the clip
    bound, read from the trajectory (which keeps g after the clip: |g| = C where it bound); the cells and their
    lr pilots, whose larger learning rates are where a clip binds first."""
    read: dict[str, tuple[float, list[float]]] = {}  # cell id -> (C, every |g|), each trajectory read once
    for r in [*ok, *pilots]:
        # only where the method reads clip_threshold (every config carries the default)
        c = r.config.get("clip_threshold") if "clip_threshold" in getattr(method_info(r), "settings", ()) else None
        if is_zo(r) and finite_number(c) and c > 0 and (gs := projected_gradients(r)):
            read[r.cell_id] = (c, [abs(g) for g in gs])

    def bound(r):
        c, gs = read[r.cell_id]
        k = sum(g >= c for g in gs)
        return f"{k} of {len(gs)} ({100 * k / len(gs):.1f}%)"

    def largest_under(r):
        c, gs = read[r.cell_id]
        under = [g for g in gs if g < c]
        return num(max(under)) if under else DASH

    cols: list[Column] = [
        ("run", lambda r: "lr pilot" if r.labels.get("stage") == "pilot" else "cell"),
        ("clip C", lambda r: num(read[r.cell_id][0])),
        ("g clipped", bound),
        ("median |g|", lambda r: num(statistics.median(read[r.cell_id][1]))),
        ("largest |g| under C", largest_under),
    ]
    clipped = [r for r in [*ok, *pilots] if r.cell_id in read]
    intro = ("The directional derivative g = (L+ - L-) / (2 eps) of every step, clipped to [-C, C] where the method "
             "clips it (QZO's `clip_threshold`, against the outliers of low-precision forwards): how many of a "
             "cell's g the clip bound, from the trajectory its record keeps (g after the clip), its lr pilots "
             "too.")
    extras = [a for a in varying_axes(clipped) if a != "stage"]  # the run column says which rows are pilots
    return section("Clipped directional derivatives", intro, cols, clipped, extras, n_text=1)


def failure_table(bad: list[CellView], extras: list[str]) -> list[str]:
    cols: list[Column] = [("status", lambda r: str(r.status)), ("reason", lambda r: one_line(r.reason))]
    return section("Failed and unsupported cells", "Cells without results, with the recorded reason.",
                   cols, bad, extras, n_text=2)
