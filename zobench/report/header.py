"""The report's header: the suite, its cells and their status, the environment, and the notes a reader
needs before the tables (random weights, cells timed beside other work, resumed cells, fallbacks)."""

from __future__ import annotations

import re

from zobench.measure.load import LOADED_CPUS
from zobench.measure.machine import machine_name
from zobench.report.cells import CellView, meaningful, phase_peak, setting
from zobench.report.table import escape, one_line
from zobench.results import latest_by_cell
from zobench.spec.matrix import SINCE_IDS_ARE_KEPT, select_cells
from zobench.spec.pilot import choose, pilot_cells

NOTES = ((lambda r: r.model_fallback_reason, "{} loaded the fallback model"), (lambda r: r.data_note, "data of {}"))
# The split's own seed, the only part of a data note that differs between a suite's seeds (zobench.tasks.base)
TRAIN_SEED = re.compile(r"\(seed (\d+)\)")


def header(recs: list[CellView], title: str | None, pilots: list[CellView] = (), progress: list[str] = ()) -> list[str]:
    """The title, the suite's line, then ``progress`` (``suite_progress``: the records are not the whole
    suite), the machine time, the environment and the notes."""
    suite = next((r.suite for r in [*recs, *pilots] if r.suite), None)
    ok = sum(r.ok for r in recs)
    by_status = {}
    for r in recs:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items(), key=lambda kv: (kv[0] != "ok", kv[0])))
    # Before the first cell of a suite with an lr pilot, its pilots say what runs where
    seen = recs or list(pilots)
    models = sorted({str(setting(r, "model")) for r in seen})
    devices = sorted({str(r.device or setting(r, "device")) for r in seen})
    finished = max((str(r.finished_at) for r in recs if r.finished_at), default=None)
    lines = [f"# {title or 'zobench report: ' + (suite or 'results')}", ""]
    none = f"no cells yet ({len(pilots)} lr pilot cells)" if pilots else "no cells"
    context = [f"Suite **{suite or '?'}**", f"model {', '.join(models)}" if seen else "",
               f"device {', '.join(devices)}" if seen else "", f"{len(recs)} cells ({tally})" if recs else none]
    if finished:
        context.append(f"finished {finished}")
    lines += ["; ".join(c for c in context if c) + ".", "", *progress]
    if pilots and any(r.machine_s for r in [*pilots, *recs]):  # what choosing the lrs cost, beside the cells
        lines += [machine_time(pilots, recs), ""]
    # the newest record's environment: a re-run's, not the run's it superseded
    newest = sorted((r for r in seen if r.env or r.git), key=lambda r: str(r.finished_at or ""))[-1:]
    env, git = (newest[0].env, newest[0].git) if newest else (None, None)
    if env or git:
        lines += [f"Environment: {environment(env or {}, git or {})}.", ""]
    lines += machines_note(recs, pilots)
    lines += commits_note(recs)
    random_weights = sum(not meaningful(r) for r in recs if r.ok)
    if random_weights:
        lines += [f"> {random_weights} of {ok} ok cells use random weights (`accuracy_meaningful: false`): "
                  "they measure memory and latency only; their accuracy columns show n/a.", ""]
    return lines + machine_notes(recs)


def moved_from(rec: CellView) -> list[str]:
    """The machines a resumed cell's earlier segments ran on other than its last segment's
    (``segment_machines``, each checked a string on load; cut to one short line each here)."""
    segments = [m for m in rec.metrics.get("segment_machines") or [] if isinstance(m, str)]
    return list(dict.fromkeys(one_line(m, 160) for m in segments[:-1] if m != segments[-1]))


def machines_note(recs: list[CellView], pilots: list[CellView] = ()) -> list[str]:
    """One line when the records come from more than one machine (a suite resumed on another host): which
    ran what, and that timings compare within one machine only. The environment line is the newest record's."""
    groups: dict[str, tuple[list, list]] = {}
    for kind, rows in ((0, recs), (1, pilots)):
        for r in rows:
            machine = machine_name(r.env)
            if machine:
                groups.setdefault(machine, ([], []))[kind].append(r)
    if len(groups) < 2:
        return []
    parts = []
    for machine, (cs, ps) in sorted(groups.items(), key=lambda kv: (-len(kv[1][0]) - len(kv[1][1]), kv[0])):
        what = [cells(len(cs)) + (f" ({', '.join(note_name(r) for r in cs)})" if 0 < len(cs) <= 6 else "")] \
            if cs else []
        what += [f"{len(ps)} lr pilot{'s' if len(ps) != 1 else ''}"] if ps else []
        parts.append(f"{escape(machine)}: {' and '.join(what)}")
    return [f"> Records from {len(groups)} machines: {'; '.join(parts)}. Compare timings (step ms, step / 2 fwd, "
            "tokens/s, speedups) within one machine: another CPU can speed a model's forwards and not a method's "
            "own passes, or the reverse. A run is the same computation on each, but floating-point rounding "
            "differs between CPUs, so a seed run on another machine need not match to the digit. The environment "
            "line above is the newest record's.", ""]


def commits_note(recs: list[CellView]) -> list[str]:
    """One line when the records were made by more than one commit of zobench (an older run's cells beside
    a re-run's, or a suite resumed across code changes): the same labels can then name two computations (a
    setting whose default changed gives a re-run cell a new id), and a reader comparing rows must know."""
    by: dict[str, list[CellView]] = {}
    for r in recs:
        commit = str((r.git or {}).get("commit") or "")[:12] or "unknown"
        by.setdefault(commit, []).append(r)
    if len(by) < 2:
        return []
    def span(group):
        days = sorted(str(r.finished_at)[:10] for r in group if r.finished_at)
        return f", {days[0]}" + (f" to {days[-1]}" if days[-1] != days[0] else "") if days else ""
    parts = sorted(by.items(), key=lambda kv: max(str(r.finished_at or "") for r in kv[1]))
    listed = "; ".join(f"{c} ({cells(len(g))}{span(g)})" for c, g in parts)
    return [f"> The records come from {len(by)} commits of zobench: {listed}. Rows with the same labels "
            "from different commits are different runs (each cell's commit is in its record's `git`).", ""]


def machine_time(pilots: list[CellView], recs: list[CellView]) -> str:
    """What the lr pilot and the cells cost: wall hours (stopped and shared time included) and, where the
    records keep them, the cells' own CPU hours (what the work took, however the machine was shared)."""
    def hours(group, key):
        return sum(getattr(r, key) or 0 for r in group) / 3600
    parts = [f"{len(pilots)} lr pilot {'cell' if len(pilots) == 1 else 'cells'} {hours(pilots, 'machine_s'):.1f} h",
             f"{cells(len(recs))} {hours(recs, 'machine_s'):.1f} h"]
    line = "Machine time, from the records' wall clocks (a resumed cell's earlier runs included where " \
           f"its record keeps them): {', '.join(parts)}."
    with_cpu = [r for r in [*pilots, *recs] if r.cpu_s is not None]
    if with_cpu:
        keep = "keeps" if len(with_cpu) == 1 else "keep"
        line += (f" CPU time of the {cells(len(with_cpu))} that {keep} it: pilots {hours(pilots, 'cpu_s'):.1f} h, "
                 f"cells {hours(recs, 'cpu_s'):.1f} h (threads summed).")
    return line


def malloc_mode(rec: CellView) -> str:
    """The cell's host allocator setting; a record from before the setting existed reads as the value every
    cell had then (``spec.matrix.SINCE_IDS_ARE_KEPT``, as its forward reference does)."""
    return str(setting(rec, "malloc") or SINCE_IDS_ARE_KEPT["malloc"])


def malloc_note(recs: list[CellView]) -> list[str]:
    """What each host allocator's figures mean (a cell's ``malloc`` setting, ``zobench.procs``): the step
    timings of ``release`` cells, the peaks of ``glibc`` cells."""
    timed = [r for r in recs if r.ok and r.metrics.get("step_s")]
    release = [r for r in timed if malloc_mode(r) == "release"]
    glibc = [r for r in recs if r.ok and malloc_mode(r) == "glibc"]
    lines = []
    if release:
        rest = ("" if glibc else "; a `malloc: glibc` cell times what a user's process gets")
        lines += [f"> {cells(len(release))} with step timings ran with `malloc: release` (every freed block over "
                  "128 KiB goes back to the OS at once, so peaks are live memory and repeat from run to run): "
                  "their forwards pay page faults a user's process does not, so their seconds read high and "
                  f"step / 2 fwd towards 1 (most on quantized models){rest}.", ""]
    if glibc:
        lines += [f"> {cells(len(glibc))} ran with `malloc: glibc` (malloc as a user's process has it): their "
                  "timings are what a user gets; their peaks include what the heap kept of freed blocks, which "
                  f"varies from run to run, and the estimate beside them is of live memory{heap_excess(glibc)}.",
                  ""]
    return lines


def heap_excess(recs: list[CellView]) -> str:
    """How far these cells' phases peaked above the estimates of live memory beside them: the largest excess,
    its phase and how many of that phase passed 25%, and the training phase's largest where the worst phase
    is another ("" where no phase has an estimate). A mask read from the cache is left out: its estimate is
    of computing it."""
    over: dict[str, list[float]] = {}
    for r in recs:
        for phase in r.phases:
            if phase == "mask" and r.mask_cached:
                continue
            peak, est = phase_peak(r, phase), r.estimated_phase_mib(phase)
            if isinstance(peak, (int, float)) and isinstance(est, (int, float)) and est > 0:
                over.setdefault(phase, []).append(peak / est - 1)
    if not over:
        return ""
    top = {phase: max(excess) for phase, excess in over.items()}
    worst = max(top, key=top.get)
    if top[worst] <= 0:
        return "; here no phase peaked above its estimate"
    said = f"; here a phase peaked up to {top[worst]:.0%} above its estimate ({worst}"
    far = sum(x > 0.25 for x in over[worst])
    if len(over[worst]) > 1 and far:
        said += f": {far} of {len(over[worst])} {worst} phases more than 25% above"
    said += ")"
    if worst != "train" and "train" in top:
        said += f", a training phase up to {top['train']:.0%}" if top["train"] > 0 else ", no training phase above it"
    return said


def machine_notes(recs: list[CellView]) -> list[str]:
    """Cells whose timings other work on the machine slowed, cells resumed from a checkpoint, and the
    recorded notes (a fallback model, the data's caveats), each once with the number of cells it concerns."""
    lines = malloc_note(recs)
    huge = [r for r in recs if any((m.file_huge_mib or 0) > 0 for m in r.phases.values())]
    if huge:
        most = max(m.file_huge_mib or 0 for r in huge for m in r.phases.values())
        lines += [f"> {cells(len(huge))} ran with part of a mapped file (the model's checkpoint) in 2 MiB pages "
                  f"(up to {most:.0f} MiB; the page cache keeps a file other processes map for long in such "
                  f"pages: a filesystem's large folios, or khugepaged): touching one value maps a whole such page, "
                  f"so their peaks can read up to ~100 MiB (float) or more (sparse ZO writing into the mapped "
                  f"weights) high; a fresh copy of the file measures as usual (results/bench/measurements.md).", ""]
    loaded = [r for r in recs if (r.phase("train").other_cpus or 0) >= LOADED_CPUS]
    if loaded:
        worst = max(r.phase("train").other_cpus for r in loaded)
        names = f" ({', '.join(note_name(r) for r in loaded)})" if len(loaded) <= 6 else ""
        its = "its" if len(loaded) == 1 else "their"
        lines += [f"> {cells(len(loaded))}{names} trained beside other work on the machine (at least "
                  f"{LOADED_CPUS} CPUs busy elsewhere on average, up to {worst:.2f}): {its} timings are slower "
                  "than on an idle machine; see `other CPUs` in the step breakdown.", ""]
    resumed = [r for r in recs if r.metrics.get("resumed_from_step")]
    if resumed:
        were = "cell was" if len(resumed) == 1 else "cells were"
        lines += [f"> {len(resumed)} {were} killed part-way and resumed from a checkpoint (steps "
                  f"{', '.join(str(r.metrics.get('resumed_from_step')) for r in resumed)}): their results "
                  "equal an uninterrupted run's on the same machine (floating-point rounding differs between "
                  "CPUs); their step timings span processes, the environment shown is the last one's.", ""]
        moved = [(r, others) for r in resumed if (others := moved_from(r))]
        if moved:
            lines += ["> Resumed on another machine than an earlier segment ran on (the record's environment is "
                      "the last segment's; its timings mix both): "
                      + "; ".join(f"{note_name(r)}, began on {', '.join(escape(m) for m in others)}"
                                  for r, others in moved) + ".", ""]
    for note_of, what in NOTES:
        groups: dict[str, list[str]] = {}  # a note with its train seed left out -> the seeds it was written with
        for r in recs:
            if note_of(r):
                note = one_line(note_of(r))
                seed = TRAIN_SEED.search(note)
                groups.setdefault(TRAIN_SEED.sub("(seed {})", note), []).append(seed[1] if seed else None)
        for key in sorted(groups):
            seeds = sorted({s for s in groups[key] if s is not None}, key=int)
            note = key.replace("seed {}", seed_list(seeds)) if seeds else key
            lines += [f"> {what.format(cells(len(groups[key])))}: {escape(note)}", ""]
    return lines


def seed_list(seeds: list[str]) -> str:
    """'seed 3' for one; 'seeds 0-9, one per cell' for a run of consecutive seeds, 'seeds 0, 2, 5, ...'
    otherwise."""
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    nums = [int(s) for s in seeds]
    run = nums == list(range(nums[0], nums[0] + len(nums))) and len(nums) > 2
    return f"seeds {f'{nums[0]}-{nums[-1]}' if run else ', '.join(seeds)}, one per cell"


def cells(n: int) -> str:
    return "1 cell" if n == 1 else f"{n} cells"


def note_name(rec: CellView) -> str:
    """A cell in a few words for a note: its method, its quantization when any, its seed."""
    cfg = rec.config
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
    if env.get("malloc_mmap_threshold"):  # records from before the allocator was a cell's setting
        parts.append(f"MALLOC_MMAP_THRESHOLD_={env['malloc_mmap_threshold']}")
    if isinstance(env.get("malloc"), dict):
        # the user's own malloc settings, as the record has them (one short line each: a record is data)
        parts.extend(one_line(f"{k}={v}", 120) for k, v in sorted(env["malloc"].items(), key=str))
    if env.get("cuda_alloc_conf"):
        parts.append(f"PYTORCH_CUDA_ALLOC_CONF={env['cuda_alloc_conf']}")
    if git.get("commit"):
        parts.append(f"git {str(git['commit'])[:12]}" + (" (dirty)" if git.get("dirty") else ""))
    return "; ".join(p for p in parts if p)


def _cells(suite, records: list):
    """(the lr pilot cells, the cells with their chosen lr, how many cells wait for their pilots, the recorded
    cell ids): the cells as ``zobench run --resume`` counts them."""
    every = select_cells(suite, None)
    pilots = pilot_cells(every, suite.lr_pilot) if suite.lr_pilot is not None else []
    chosen = choose(every, suite.lr_pilot, records)[0] if suite.lr_pilot is not None else every
    # cells whose pilots have not all finished: none has its record yet
    return pilots, chosen, len(every) - len(chosen), {r.cell_id for r in latest_by_cell(records)}


def cells_without_record(suite, records: list) -> int:
    """The suite's cells (not its lr pilots) with no record in ``records``, counted as ``suite_progress`` does."""
    if suite is None:
        return 0
    _, chosen, waiting, recorded = _cells(suite, records)
    return sum(c.cell_id not in recorded for c in chosen) + waiting


def pilots_without_record(suite, records: list) -> tuple[int, int]:
    """(the suite's lr pilot cells with no record in ``records``, how many it declares)."""
    if suite is None:
        return 0, 0
    pilots, _, _, recorded = _cells(suite, records)
    return sum(c.cell_id not in recorded for c in pilots), len(pilots)


def suite_progress(suite, records: list, suite_file: str | None, unread: str | None = None) -> list[str]:
    """A line when some of the suite's cells have no record (a run going on or stopped, or some cells run
    with --only), so that no one reads a part as the whole; and when some records are not cells of the suite
    as it reads now (it, or a default, changed since they ran). ``suite``: the records' suite as
    ``suite_file`` reads now (``report.records_suite``). The cells are counted as ``zobench run --resume``
    counts them: with each learning rate its pilot chose. ``unread``: why ``suite_file`` could not be read."""
    if suite is None:
        if not unread:
            return []
        return [f"> The suite file these records name, {suite_file}, could not be read ({unread}): this report "
                f"cannot tell whether every cell of the suite is in, nor whether its claims changed after the "
                f"data; it decides the claims as the latest record declared them. Make the report where the "
                f"suite ran, or name its file with `zobench report --suite`.", ""]
    pilots, chosen, waiting, recorded = _cells(suite, records)
    strangers = recorded - {c.cell_id for c in [*chosen, *pilots]}
    if strangers == recorded:
        return [f"> None of these records is a cell of {suite_file} as it reads now (the file, or a "
                f"default, changed since they ran).", ""]
    parts = []
    for group, what, held in ((pilots, "lr pilot cells", 0), (chosen, "cells", waiting)):
        missing = sum(c.cell_id not in recorded for c in group) + held
        if missing:
            parts.append(f"{missing} of the suite's {len(group) + held} {what} {'has' if missing == 1 else 'have'} "
                         f"no record")
    lines = []
    if parts:
        lines.append(f"> Not the whole suite: {'; '.join(parts)} (not run yet, or left out with --only). The "
                     f"tables, plots and verdicts below are of the cells recorded so far; `zobench run "
                     f"{suite_file} --resume` runs the others.")
    if strangers:
        lines.append(f"> {cells(len(strangers))} in these records {'is' if len(strangers) == 1 else 'are'} "
                     f"not among the suite's cells as its file reads now (the file, or a default, changed since "
                     f"they ran).")
    return [line for text in lines for line in (text, "")]
