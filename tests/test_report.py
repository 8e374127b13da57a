"""The report: markdown equal to a golden file, valid PNGs, pure (same records -> same bytes), robust to
records with nothing in them. Regenerate the golden after an intended change with

    ZOBENCH_UPDATE_GOLDEN=1 python -m pytest -q tests/test_report.py

and read the diff: its numbers must be the fixture's (e.g. peak_over_inference 1.3712 -> "1.37").
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from zobench.cell.record import CellRecord
from zobench.report import render_report
from zobench.results import load_records

DATA = Path(__file__).parent / "data"
FIXTURE, GOLDEN = DATA / "report_fixture.jsonl", DATA / "report_golden.md"
PNG = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = {"memory.png", "memory_by_phase.png", "step_breakdown.png", "loss.png", "dev_accuracy.png",
             "memory_vs_accuracy.png"}


@pytest.fixture(scope="module")
def records() -> list[CellRecord]:
    return load_records(FIXTURE)


@pytest.fixture(scope="module")
def rendered(records, tmp_path_factory) -> Path:
    # The file is named report.md so that the golden's links read report_plots/<name>.png.
    return render_report(records, tmp_path_factory.mktemp("a") / "report.md")


def with_metrics(**values) -> CellRecord:
    rec = CellRecord("c")
    rec.metrics.set(**values)
    return rec


def links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_markdown_matches_golden(rendered):
    text = rendered.read_text(encoding="utf-8")
    if os.environ.get("ZOBENCH_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")


def test_the_results_table_is_computed_from_the_raw_records(rendered):
    """Beside the golden file (which pins the layout), the results table's figures recomputed from the
    fixture's raw measurements: peak = the training phases' peak RSS, peak / inference against the forward
    cell of the same quant, step ms the median step, speedup the full ZO median step over the cell's."""
    raw = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    ok = {(r["labels"]["method"], r["labels"]["quant"]): r for r in raw if r["status"] == "ok"}

    def peak(r):
        return max(r["phases"][p]["peak_rss_mib"] for p in ("warmup", "train"))

    md = rendered.read_text(encoding="utf-8").splitlines()
    head = next(i for i, line in enumerate(md) if line.startswith("| method | quant | density | density obtained"))
    cols = [c.strip() for c in md[head].strip("|").split("|")]
    rows = [dict(zip(cols, (c.strip() for c in line.strip("|").split("|")))) for line in md[head + 2:]
            if line.startswith("|")][:len(ok)]
    assert {(r["method"], r["quant"]) for r in rows} == set(ok)
    for row in rows:
        r = ok[(row["method"], row["quant"])]
        assert row["peak MiB"] == f"{peak(r):.0f}"
        assert row["step ms (p10-p90)"].startswith(f"{1000 * r['metrics']['step_s']['median']:.3g}")
        fwd, full = ok.get(("forward", row["quant"])), ok.get(("full", row["quant"]))
        if row["method"] != "forward" and fwd:
            assert row["peak / inference"] == f"{peak(r) / peak(fwd):.2f}"
        if row["method"] not in ("forward", "full") and full:
            ratio = full["metrics"]["step_s"]["median"] / r["metrics"]["step_s"]["median"]
            assert row["speedup vs full"].startswith(f"{ratio:.2f}")


def test_plots_are_pngs_linked_relatively(rendered):
    md = rendered.read_text(encoding="utf-8")
    assert {Path(p).name for p in links(md)} == ALL_PLOTS
    for rel in links(md):
        assert not Path(rel).is_absolute() and rel.startswith("report_plots/")
        data = (rendered.parent / rel).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000


def test_rendering_is_pure(records, rendered, tmp_path):
    again = render_report(copy.deepcopy(records), tmp_path / "report.md")
    assert again.read_text(encoding="utf-8") == rendered.read_text(encoding="utf-8")
    for name in ALL_PLOTS:  # PNG metadata carries no version or date, so the images are identical too
        assert (tmp_path / "report_plots" / name).read_bytes() == (rendered.parent / "report_plots" / name).read_bytes()


def test_plots_without_data_are_skipped(records, tmp_path):
    recs = copy.deepcopy(records)
    for r in recs:  # random weights: accuracy means nothing, and no dev evaluation ran
        r.accuracy_meaningful = False
        r.metrics.values.pop("dev_curve", None)
    stale = tmp_path / "r_plots" / "dev_accuracy.png"
    render_report(records, tmp_path / "r.md")  # an earlier render, with dev curves
    assert stale.is_file()
    md = render_report(recs, tmp_path / "r.md").read_text(encoding="utf-8")
    assert {Path(p).name for p in links(md)} == ALL_PLOTS - {"dev_accuracy.png", "memory_vs_accuracy.png"}
    assert {p.name for p in stale.parent.iterdir()} == ALL_PLOTS - {"dev_accuracy.png", "memory_vs_accuracy.png"}
    assert "accuracy_meaningful: false" in md and "| n/a |" in md


def test_a_report_replaces_only_a_report_and_plots_it_wrote(records, tmp_path):
    """A suite's name chooses the report's file name: a file zobench did not write there (a markdown file of
    the user's, a PNG of theirs in the plots folder under a plot's name) is refused in one line and kept,
    before anything is drawn. A report and plots from before zobench marked them (no mark line, no PNG
    text chunk) are still its own: the report by its first line, a plot by that report's link to it."""
    from zobench.errors import OutputError

    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    with pytest.raises(OutputError, match="not a report zobench wrote") as e:
        render_report(records, notes)
    assert notes.read_text() == "# my notes\n" and not (tmp_path / "notes_plots").exists() and "\n" not in str(e.value)
    with open(tmp_path / "big.md", "wb") as f:  # a huge file is not read to find out (sparse: no disk used)
        f.write(b"# zobench report: x\n")
        f.truncate(65 << 20)
    with pytest.raises(OutputError, match="not a report zobench wrote"):
        render_report(records, tmp_path / "big.md")

    own = tmp_path / "r_plots" / "memory.png"
    own.parent.mkdir()
    own.write_bytes(PNG)  # the user's, under a plot's name, no report beside it
    with pytest.raises(OutputError, match="not a plot zobench wrote"):
        render_report(records, tmp_path / "r.md")
    assert own.read_bytes() == PNG and not (tmp_path / "r.md").exists() and os.listdir(own.parent) == ["memory.png"]

    # an unmarked report and plot from an earlier zobench: replaced, the plot because that report links it
    (tmp_path / "r.md").write_text("# zobench report: s\n\n![Peak memory](r_plots/memory.png)\n")
    md = render_report(records, tmp_path / "r.md").read_text(encoding="utf-8")
    assert md.rstrip().endswith("-->") and own.read_bytes() != PNG
    assert {p.name for p in own.parent.iterdir()} == {Path(p).name for p in links(md)}
    render_report(records, tmp_path / "r.md")  # and its own output, marked, again


def test_failed_record_without_metrics(tmp_path):
    bare = CellRecord("c1", status="failed", labels={"method": "sensitive", "quant": "nf4", "density": 1e-3},
                      reason="CUDA out of memory | tried to allocate 2.0 GiB\nsecond line")
    md = render_report([bare], tmp_path / "f.md", title="Bare").read_text(encoding="utf-8")
    assert md.startswith("# Bare\n")
    assert "| sensitive | nf4 | 0.1% | failed | CUDA out of memory \\| tried to allocate 2.0 GiB second line |" in md
    assert "## Plots" not in md and not (tmp_path / "f_plots").exists()


def test_no_records_renders_an_empty_report(tmp_path):
    md = render_report([], tmp_path / "e.md").read_text(encoding="utf-8")
    assert "no cells" in md and "|" not in md


def test_point_labels_never_overlap(records):
    """Cells that land on the same memory and accuracy get labels nudged apart, not printed over each other."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from zobench.report import views
    from zobench.report.plots import memory_vs_accuracy

    recs = [r for r in views(copy.deepcopy(records)) if r.ok]
    for r in recs:  # every point on one spot: the worst case
        r.derived.peak_mib = 500.0
        if r.metrics.get("test_after"):
            r.metrics.set(test_after={"accuracy": 0.5})
    fig = memory_vs_accuracy(recs, [])
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts if t.get_text()]
    assert len(boxes) >= 3
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_cells_timed_beside_other_work_are_flagged(records, tmp_path):
    loaded = copy.deepcopy(records)
    timed = [r for r in loaded if r.ok and r.metrics.step_parts_s and "train" in r.phases]
    timed[0].phases["train"].other_cpus = 1.25
    for r in timed[1:]:
        r.phases["train"].other_cpus = 0.0
    md = render_report(loaded, tmp_path / "report.md").read_text(encoding="utf-8")
    name = f"{timed[0].config['method']}" + ("" if timed[0].config.get("quant") in (None, "none")
                                             else f" {timed[0].config['quant']}") + f" seed {timed[0].config['seed']}"
    assert f"> 1 cell ({name}) trained beside other work on the machine (at least 0.25 CPUs busy elsewhere on " \
           "average, up to 1.25)" in md
    step_section = md.split("## Step breakdown")[1].split("\n## ")[0]
    header = next(line for line in step_section.splitlines() if line.startswith("| "))
    assert header.rstrip().endswith("| other CPUs |")
    assert sum(line.rstrip().endswith("| 1.25 |") for line in step_section.splitlines()) == 1
    # Records without the measure (older ones) get neither the note nor the column: the golden holds.
    assert "other CPUs" not in GOLDEN.read_text(encoding="utf-8")


def test_lr_choices_at_the_grid_edge_or_from_a_flat_dev_say_so():
    from zobench.report.learning_rates import lr_caveat

    grid = [3e-7, 1e-6, 3e-6]
    assert lr_caveat({"grid": grid, "dev": [0.63, 0.635, 0.645], "chosen": 3e-6}) == " (grid edge)"
    assert lr_caveat({"grid": grid, "dev": [0.64, 0.63, 0.62], "chosen": 3e-7}) == " (grid edge)"
    assert lr_caveat({"grid": grid, "dev": [0.645, 0.665, 0.66], "chosen": 1e-6}) == ""
    assert lr_caveat({"grid": grid, "dev": [0.625, 0.625, 0.625], "chosen": 3e-7}) == " (dev equal at every lr)"
    assert lr_caveat({"grid": grid, "dev": [0.6, None, 0.6], "chosen": 3e-7}) == " (grid edge)"  # one failed
    assert lr_caveat({"grid": [1e-4], "dev": [0.6], "chosen": 1e-4}) == ""


def test_a_run_whose_dev_fell_after_the_pilot_says_so():
    from zobench.report.learning_rates import run_dev

    def rec(accs, n_dev=200):
        curve = [{"step": 100 * (i + 1), "accuracy": a} for i, a in enumerate(accs)]
        return with_metrics(dev_curve=curve, n_dev=n_dev)

    # 68.0% at step 100 down to 47.5%: far beyond +-6.5 points on 200 dev examples
    assert run_dev(rec([0.68, 0.665, 0.415, 0.475])) == "68.0 (100) -> 47.5 (400) (fell by more than dev noise)"
    assert run_dev(rec([0.70, 0.72, 0.69])) == "72.0 (200) -> 69.0 (300)"   # inside the noise
    assert run_dev(rec([0.70, 0.72, 0.69], n_dev=20_000)).endswith("(fell by more than dev noise)")
    assert run_dev(rec([0.70, 0.70])) == "70.0 (100) -> 70.0 (200)"   # ties: the earlier step is the best
    assert run_dev(with_metrics()) == "-"


def test_a_run_whose_training_loss_rose_above_its_start_says_so():
    import random

    from zobench.report.learning_rates import loss_rise

    def rec(levels, sd=0.2, per=100, seed=0):
        rng = random.Random(seed)  # per-step noise like a batch of 16's loss
        losses = [lvl + rng.gauss(0, sd) for lvl in levels for _ in range(per)]
        return with_metrics(loss_curve=losses, steps_done=len(losses))

    # Falling, then a late wobble well below the start: no flag.
    falling = [0.78, 0.61, 0.58, 0.57, 0.56, 0.55, 0.54, 0.60, 0.58, 0.58]
    assert "rose" not in loss_rise(rec(falling))
    # Up from 0.70 to 0.95 in the fourth tenth (an lr too large for the run): flagged with where.
    rising = [0.70, 0.66, 0.68, 0.95, 0.84, 0.80, 0.75, 0.73, 0.73, 0.73]
    text = loss_rise(rec(rising))
    assert "rose above its start: 0.9" in text and "at steps 301-400" in text
    # The same rise inside much noisier losses is not told apart from the noise.
    assert "rose" not in loss_rise(rec(rising, sd=2.0))
    # Steps are mapped when the curve is subsampled (a point every 10 steps).
    curve = rec(rising, sd=0.05, per=10).metrics.get("loss_curve")
    text = loss_rise(with_metrics(loss_curve=curve, steps_done=1000))
    assert "at steps 301-400" in text
    assert loss_rise(with_metrics(loss_curve=[0.7] * 5)) == "-"


def test_rows_differing_in_a_numeric_label_sort_by_its_value():
    """Pilot rows of one method list their lrs in increasing order (as text, 1e-06 sorted before 3e-07)."""
    from zobench.report.cells import sort_key

    def rec(lr, seed=0):
        return CellRecord(f"{lr}-{seed}", config={"method": "full", "lr": lr},
                          labels={"method": "full", "lr": lr, "seed": seed, "stage": "pilot"})

    lrs = [1e-6, 3e-6, 3e-7, 1e-5, 3e-5]
    assert [r.labels["lr"] for r in sorted(map(rec, lrs), key=sort_key)] == sorted(lrs)
    assert [r.labels["seed"] for r in sorted([rec(1e-6, 10), rec(1e-6, 2)], key=sort_key)] == [2, 10]


def test_gpu_records_show_the_device_allocated_and_reserved_peaks_side_by_side(tmp_path):
    """The H200 run of suites/smoke-cuda.yaml: each cell's driver-level peak beside the allocator's two."""
    recs = load_records(Path(__file__).resolve().parents[1] / "results" / "gpu" / "smoke-cuda.jsonl")
    md = render_report(recs, tmp_path / "gpu.md").read_text(encoding="utf-8")
    section = md.split("## GPU memory")[1].split("\n## ")[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    col = {name: header.index(name) for name in ("method", "device MiB", "measured as", "max allocated MiB",
                                                  "max reserved MiB")}
    full = next(r for r in rows[2:] if r[col["method"]].strip() == "full")
    rec = next(r for r in recs if r.method == "full")
    assert float(full[col["device MiB"]]) == round(rec.phases["train"].device_peak_mib)
    assert full[col["measured as"]].strip() == "process"
    assert float(full[col["max allocated MiB"]]) < float(full[col["max reserved MiB"]]) < float(full[col["device MiB"]])
    # CPU records have no such section (the golden report's fixture is a CPU run)
    assert "## GPU memory" not in GOLDEN.read_text(encoding="utf-8")


def test_cells_resumed_from_a_checkpoint_are_flagged(records, tmp_path):
    resumed = copy.deepcopy(records)
    cell = next(r for r in resumed if r.ok and r.metrics.step_parts_s)
    cell.metrics.set(resumed_from_step=400, segments=2)
    md = render_report(resumed, tmp_path / "report.md").read_text(encoding="utf-8")
    assert "> 1 cell was killed part-way and resumed from a checkpoint (steps 400)" in md
    assert "resumed from a checkpoint" not in GOLDEN.read_text(encoding="utf-8")
    assert "Resumed on another machine" not in md  # no earlier machine recorded: nothing said
    here = "This CPU (2 cores)"  # the segments are compared with each other, not with the record's env
    cell.metrics.set(segment_machines=[here, here])  # both segments on one machine: nothing said either
    assert "Resumed on another machine" not in render_report(resumed, tmp_path / "r.md").read_text(encoding="utf-8")
    cell.metrics.set(segment_machines=["Other CPU | x (8 cores)", here, here])
    md = render_report(resumed, tmp_path / "r.md").read_text(encoding="utf-8")
    note = next(line for line in md.splitlines() if line.startswith("> Resumed on another machine"))
    assert note.endswith(f"{cell.method} seed {cell.config.get('seed', 0)}, began on Other CPU \\| x (8 cores).")


def test_records_from_two_machines_say_which_ran_what(records, tmp_path):
    moved = copy.deepcopy(records)
    other = [r for r in moved if r.ok][:2]
    for r in other:
        r.env = {**r.env, "cpu": "Other CPU | with a pipe\nand a newline", "cpu_count": 4}
    md = render_report(moved, tmp_path / "report.md").read_text(encoding="utf-8")
    note = next(line for line in md.splitlines() if line.startswith("> Records from 2 machines"))
    first = records[0].env["cpu"]
    assert re.search(re.escape(f"{first} ({records[0].env['cpu_count']} cores): ") + r"\d+ cells", note)
    # the other machine's two cells by name; its name one line, its pipe escaped for the markdown
    names = ", ".join(f"{r.method}{' ' + r.config['quant'] if r.config.get('quant') not in (None, 'none') else ''} "
                      f"seed {r.config.get('seed', 0)}" for r in other)
    assert "Other CPU \\| with a pipe and a newline (4 cores): 2 cells (" + names + ")" in note
    assert "Records from" not in GOLDEN.read_text(encoding="utf-8")  # one machine: no note
    # the step breakdown names each timed cell's machine, since its timings compare within one only
    steps = md.split("## Step breakdown (ms)")[1].split("\n## ")[0]
    header = next(line for line in steps.splitlines() if line.startswith("| "))
    assert header.rstrip(" |").endswith("| machine")
    rows = [line for line in steps.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert sum("Other CPU" in row for row in rows) == sum(bool(r.metrics.step_parts_s) for r in other) == 2
    assert "| machine |" not in GOLDEN.read_text(encoding="utf-8")


def test_data_notes_differing_only_in_the_train_seed_are_one_line_naming_the_seeds(records, tmp_path):
    noted = copy.deepcopy(records)
    ok = [r for r in noted if r.ok]
    for i, rec in enumerate(ok):
        seed = [0, 1, 2, 5][i % 4] if i < len(ok) - 1 else 7
        rec.data_note = f"sst2: dev is 200 rows of the validation split (fixed, seed 1234); train 10 rows (seed {seed})"
    md = render_report(noted, tmp_path / "report.md").read_text(encoding="utf-8")
    notes = [line for line in md.splitlines() if line.startswith("> data of")]
    assert notes == [f"> data of {len(ok)} cells: sst2: dev is 200 rows of the validation split (fixed, seed 1234); "
                     f"train 10 rows (seeds 0, 1, 2, 5, 7, one per cell)"]
    for rec in ok[:3]:
        rec.data_note = f"sst2: train 10 rows (seed {ok.index(rec) + 3})"
    md = render_report(noted, tmp_path / "report.md").read_text(encoding="utf-8")
    assert "> data of 3 cells: sst2: train 10 rows (seeds 3-5, one per cell)" in md


def test_a_mask_read_from_the_cache_is_marked_cached_beside_its_estimate(records, tmp_path):
    """A mask phase that read its mask from the cache measures the read, not the computation its estimate
    prices: the phase table says cached rather than set the two side by side."""
    cached = copy.deepcopy(records)
    cell = next(r for r in cached if r.metrics.get("mask_cache_hit") is True)
    assert "| 305 (cached) / 0.05 s |" in GOLDEN.read_text(encoding="utf-8")  # the fixture's, without an estimate
    cell.estimate = {"peak_mib": 400.0, "breakdown": {}, "phases": {"mask": 1038.0, "train": 400.0}}
    md = render_report(cached, tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| 305 (cached; est. 1038 computed) / 0.05 s |" in md
    assert "(est. 400) / 1.17 s" in md  # the other phases keep theirs


def test_pilot_chosen_lrs_do_not_split_twins_and_forward_cells_show_no_lr(records, tmp_path):
    """A suite whose lr is chosen per method by the pilot: the NF4 cell still finds its float twin (another
    lr), and the forward reference cells, which train nothing, show no lr."""
    recs = copy.deepcopy([r for r in records if r.ok and r.method in ("forward", "sensitive")])
    quants = {r.config["quant"] for r in recs}
    assert "none" in quants and len(quants) > 1, "the fixture needs float and quantized cells"
    for r in recs:
        if r.method == "forward":
            r.labels["lr"] = r.config["lr"] = 1e-6
        else:  # each side's lr chosen on dev, different for float and quantized weights
            lr = 1e-4 if r.config["quant"] == "none" else 3e-4
            r.labels["lr"] = r.config["lr"] = lr
            r.lr_choice = {"grid": [1e-4, 3e-4], "dev": [0.6, 0.6], "chosen": lr, "pilot_steps": 10}
    md = render_report(recs, tmp_path / "report.md").read_text(encoding="utf-8")
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in md.split("## Results")[1].split("\n## ")[0]
            .splitlines() if line.startswith("| ")]
    lr, name = rows[0].index("lr"), rows[0].index("method")
    assert {row[lr] for row in rows[1:] if row[name] == "forward"} == {"-"}
    assert {row[lr] for row in rows[1:] if row[name] == "sensitive"} == {"0.0001", "0.0003"}
    quant = md.split("## Quantization trade-off")[1].split("\n## ")[0]
    qrows = [[c.strip() for c in line.split("|")[1:-1]] for line in quant.splitlines() if line.startswith("| ")]
    vs, name = qrows[0].index("peak / float"), qrows[0].index("method")
    sens = [row for row in qrows[1:] if row[name] == "sensitive"]
    assert sens and all(row[vs] != "-" for row in sens)


def test_records_from_several_commits_are_said_so_and_the_newest_environment_shown(records, tmp_path):
    """A re-run appended beside an older run: the header names each commit with its cells, and the
    environment line is the newest record's, not whichever came first in the file."""
    recs = copy.deepcopy(records)
    assert len({r.git.get("commit") for r in recs if r.git}) == 1, "the fixture is one run"
    newer = [r for r in recs if r.cell_id in {x.cell_id for x in recs if x.ok and x.method != "forward"}][-2:]
    assert newer[0].cell_id != newer[1].cell_id
    for r in newer:
        r.git = {"commit": "f" * 40, "dirty": False}
        r.finished_at = "2099-01-01T00:00:00Z"
        r.env = {**(r.env or {}), "python": "3.99.0"}
    md = render_report(recs, tmp_path / "report.md").read_text(encoding="utf-8")
    line = next(x for x in md.splitlines() if x.startswith("> The records come from"))
    assert "2 commits" in line and "ffffffffffff (2 cells, 2099-01-01)" in line
    assert line.index(str(recs[0].git["commit"])[:12]) < line.index("ffffffffffff")  # oldest first
    env = next(x for x in md.splitlines() if x.startswith("Environment:"))
    assert "Python 3.99.0" in env and "git ffffffffffff" in env
    assert "The records come from" not in GOLDEN.read_text(encoding="utf-8")


def test_gpu_cells_show_each_phase_s_host_memory_beside_its_estimate(tmp_path):
    """The H200's 7B sensitive + NF4 cell: its mask phase held 10.1 GiB of host memory (the kept calibration
    inputs) while the card held 3.3 GiB; the report says so phase by phase, with the estimate where the
    record carries one."""
    from zobench.analysis.estimate import record_estimate

    root = Path(__file__).resolve().parents[1]
    recs = load_records(root / "results" / "gpu" / "llama7b.jsonl")[-2:]
    for r in recs:
        r.estimate = record_estimate(dict(r.config, predictions=None))
    md = render_report(recs, tmp_path / "r.md").read_text(encoding="utf-8")
    section = md.split("## Host memory by phase (GPU cells)")[1].split("\n## ")[0]
    (row,) = [line for line in section.splitlines() if line.startswith("| sensitive")]
    mask = recs[-1].phase("mask").peak_rss_mib
    est = recs[-1].estimate["host_phases"]["mask"]
    assert f"{mask:.0f} (est. {est:.0f})" in row and row.endswith(f"| {mask:.0f} (mask) |")


def test_records_of_part_of_a_suite_say_how_many_cells_have_none(tmp_path):
    """A report of a suite still running (or run with --only) says how many of its cells have no record yet,
    counted as --resume counts them; records that are no cell of the suite as it reads now are said so."""
    from zobench.spec.matrix import select_cells
    from zobench.spec.suite import load_suite

    suite_file = DATA / "tiny_suite.yaml"
    cells = select_cells(load_suite(suite_file), None)  # full, random and their forward reference cell
    ids = [c.cell_id for c in cells]
    assert len(ids) == 3

    def rec(cell_id, status="ok"):
        return CellRecord(cell_id, status=status, suite="t", suite_file=str(suite_file),
                          labels={"method": "x"}, config={"method": "x"})

    def notes(records):
        md = render_report(records, tmp_path / "report.md").read_text(encoding="utf-8")
        return [line for line in md.splitlines() if line.startswith("> Not the whole") or "suite's cells" in line
                or line.startswith("> None of these")]

    one = notes([rec(ids[0]), rec(ids[1])])
    assert len(one) == 1 and "1 of the suite's 3 cells has no record" in one[0]
    assert f"zobench run {suite_file} --resume" in one[0]
    assert "2 of the suite's 3 cells have no record" in notes([rec(ids[0])])[0]
    # A failed cell has its record (the failures table shows it): the suite is whole.
    assert notes([rec(ids[0]), rec(ids[1]), rec(ids[2], status="error")]) == []
    stranger = notes([*map(rec, ids), rec("ffffffffffff")])
    assert stranger == ["> 1 cell in these records is not among the suite's cells as its file reads now (the file, "
                        "or a default, changed since they ran)."]
    assert notes([rec("ffffffffffff")]) == [f"> None of these records is a cell of {suite_file} as it reads now "
                                             "(the file, or a default, changed since they ran)."]
    # Records of another suite than the file now holds, or a file that cannot be read: nothing is counted.
    other = [CellRecord(ids[0], suite="renamed", suite_file=str(suite_file))]
    gone = [CellRecord(ids[0], suite="t", suite_file=str(tmp_path / "no-such.yaml"))]
    assert notes(other) == notes(gone) == []


def test_the_report_says_what_each_allocators_figures_mean():
    """Cells under ``malloc: release`` (and records from before the setting, which all ran so) are told
    apart from ``malloc: glibc`` ones: the first's step timings read high, the second's peaks carry the heap."""
    from zobench.report.cells import CellView
    from zobench.report.header import malloc_note
    from zobench.results import Derived

    recs = [CellView.of(r, Derived()) for r in load_records(FIXTURE) if r.ok]
    assert len(recs) == 6
    note = malloc_note(recs)
    assert len(note) == 2 and note[0].startswith("> 6 cells with step timings ran with `malloc: release`")
    for r in recs[:2]:
        r.config["malloc"] = "glibc"
    note = malloc_note(recs)
    assert note[0].startswith("> 4 cells with step timings ran with `malloc: release`")
    assert note[2].startswith("> 2 cells ran with `malloc: glibc`") and "estimate beside them is of live" in note[2]
    for r in recs:
        r.config["malloc"] = "glibc"
    assert len(malloc_note(recs)) == 2 and "6 cells ran with `malloc: glibc`" in malloc_note(recs)[0]


def test_the_glibc_note_says_how_far_the_phases_peaked_above_their_estimates():
    """The heap's part of a ``malloc: glibc`` cell's peaks is read from the records (the largest excess over
    the estimate of live memory, its phase, and the training phase's), not said as a fixed figure: a
    quantize phase whose heap kept the replaced float layers peaked 113% above its estimate."""
    from zobench.report.cells import CellView
    from zobench.report.header import heap_excess, malloc_note
    from zobench.results import Derived

    recs = [CellView.of(r, Derived()) for r in load_records(FIXTURE) if r.ok][:3]
    for r in recs:
        r.config["malloc"] = "glibc"
    assert heap_excess(recs) == ""  # no estimates, nothing said
    for r, quantize in zip(recs, (1108.0, 530.0, 700.0)):
        r.phases["quantize"] = replace(r.phases["load"], peak_rss_mib=quantize)
        r.estimate = {"phases": {"quantize": 520.0, "train": r.phases["train"].peak_rss_mib / 1.1}}
    said = heap_excess(recs)
    assert said == ("; here a phase peaked up to 113% above its estimate (quantize: 2 of 3 quantize phases more "
                    "than 25% above), a training phase up to 10%"), said
    assert said in malloc_note(recs)[0]
    for r in recs:  # every phase at or under its estimate
        r.estimate = {"phases": {"quantize": 2000.0, "train": 2000.0}}
    assert heap_excess(recs) == "; here no phase peaked above its estimate"


def test_the_environment_line_names_the_users_malloc_settings_on_one_bounded_line():
    from zobench.report.header import environment

    tunables = "glibc.malloc.x=1\n\n## Results" * 40
    line = environment({"malloc": {"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": tunables}}, {})
    assert "MALLOC_ARENA_MAX=2" in line and "GLIBC_TUNABLES=glibc.malloc.x=1 ## Results" in line
    assert "\n" not in line and len(line) < 300  # a record's text cannot start a heading or run on


def test_the_report_reads_the_records_suite_from_anywhere_and_says_when_it_cannot(tmp_path, monkeypatch):
    """A record names its suite file as `zobench run` was given it (suites/x.yaml, relative to where the run
    was): a report made from another folder found no file and dropped, without a word, the "not the whole
    suite" line and every verdict's "interim" label. It now looks beside the results folder too, says so when
    it cannot read the file at all, and takes the file from --suite."""
    from zobench.errors import UserError
    from zobench.report import records_suite

    project = tmp_path / "project"
    (project / "suites").mkdir(parents=True)
    text = (Path(__file__).resolve().parents[1] / "suites" / "smoke.yaml").read_text()
    (project / "suites" / "smoke.yaml").write_text(text)
    rec = CellRecord("c1", suite="smoke", suite_file="suites/smoke.yaml", labels={"method": "full"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    suite, named, unread = records_suite([rec], project / "results")
    assert suite is not None and suite.name == "smoke" and named == "suites/smoke.yaml" and unread is None
    md = render_report([rec], tmp_path / "r.md", results_dir=project / "results").read_text()
    assert "None of these records is a cell of suites/smoke.yaml as it reads now" in md  # the suite was read
    assert "could not be read" not in md

    (project / "suites" / "smoke.yaml").rename(project / "suites" / "moved.yaml")
    assert records_suite([rec], project / "results") == (None, "suites/smoke.yaml", "not found")
    md = render_report([rec], tmp_path / "r.md", results_dir=project / "results").read_text()
    assert "> The suite file these records name, suites/smoke.yaml, could not be read (not found)" in md
    md = render_report([rec], tmp_path / "r.md", results_dir=project / "results",
                       suite_path=project / "suites" / "moved.yaml").read_text()
    assert "None of these records is a cell of " + str(project / "suites" / "moved.yaml") in md
    assert "could not be read" not in md

    (project / "suites" / "smoke.yaml").write_text(text.replace("name: smoke", "name: other"))
    assert records_suite([rec], project / "results")[2].endswith("is now suite 'other'")
    with pytest.raises(UserError, match="suite 'other', but the records are of suite 'smoke'"):
        records_suite([rec], project / "results", project / "suites" / "smoke.yaml")



def test_the_loss_plot_draws_a_line_a_configuration_with_its_seeds_range():
    """A suite of many seeds gives one legend entry a configuration, not one a run (a legend of 50 runs
    collapsed the axes), and each line is a trailing mean of the noisy per-batch losses whose gaps stay
    where a step's loss was not finite."""
    import math

    from zobench.report import views
    from zobench.report.cells import varying_axes
    from zobench.report.curves import loss_curves, smoothed

    assert smoothed([1.0, 3.0, float("inf"), 5.0, 7.0], 2) == [1.0, 2.0, 3.0, 5.0, 6.0]
    assert math.isnan(smoothed([float("nan"), 1.0], 3)[0])
    recs = []
    for method, level in (("sensitive", 0.5), ("random", 0.8)):
        for seed in range(5):
            r = CellRecord(f"{method}-{seed}", config={"method": method, "seed": seed, "lr": 1e-4, "steps": 200})
            r.metrics.set(loss_curve=[level + 0.1 * seed + 0.05 * (i % 3) for i in range(200)])
            recs.append(r)
    cells = views(recs)
    fig = loss_curves(cells, varying_axes(cells))
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == \
        ["random/none (5 seeds)", "sensitive/none (5 seeds)"]
    assert "trailing mean of 4 steps" in ax.get_title()
    sens = next(line for line in ax.get_lines() if line.get_label().startswith("sensitive"))
    # the seeds' mean (levels 0.5 + 0.1 seed, seeds 0-4: 0.7) plus the 4-step mean of the 0.05 (i % 3) wiggle
    assert abs(sens.get_ydata()[-1] - (0.7 + 0.05 * (1 + 2 + 0 + 1) / 4)) < 1e-9
    assert len(ax.collections) == 2  # a shaded range over seeds a configuration


def test_one_method_on_two_quant_backends_is_two_lines_a_reader_can_tell_apart():
    """A method's colour is the same whatever its quant backend, so the backend is the line style: float
    solid, nf4 and nf4-plain (one method's two arms in the quantized-zo suite) each a style of its own, in
    the loss and dev curves alike."""
    from zobench.report import views
    from zobench.report.cells import varying_axes
    from zobench.report.curves import dev_curves, loss_curves

    recs = []
    for q in ("nf4-plain", "none", "nf4"):
        r = CellRecord(f"sensitive-{q}", config={"method": "sensitive", "quant": q, "seed": 0, "steps": 20})
        r.metrics.set(loss_curve=[1.0] * 20, dev_curve=[{"step": 10, "accuracy": 0.6}, {"step": 20, "accuracy": 0.7}])
        recs.append(r)
    cells = views(recs)
    for fig in (loss_curves(cells, varying_axes(cells)), dev_curves(cells, varying_axes(cells))):
        styles = {line.get_label().split("/")[1]: line.get_linestyle() for line in fig.axes[0].get_lines()}
        assert styles["none"] == "-" and len(set(styles.values())) == 3, styles
        assert len({line.get_color() for line in fig.axes[0].get_lines()}) == 1


def seeded(records: list[CellRecord], runs: dict[str, tuple]) -> list[CellRecord]:
    """The fixture's float forward cell, and for each method its float cell again a seed a (training peak MiB,
    test accuracy after training) pair, the other phases no higher than the training one; no test at best
    dev, so the accuracy read is the one set here."""
    base = {r.labels["method"]: r for r in records if r.labels.get("quant") == "none"}
    out = [copy.deepcopy(base["forward"])]
    for method, pairs in runs.items():
        for seed, (peak, score) in enumerate(pairs):
            r = copy.deepcopy(base[method])
            r.cell_id, r.config["seed"], r.labels["seed"] = f"{method}-{seed}", seed, seed
            for phase in r.phases.values():
                phase.peak_rss_mib = min(phase.peak_rss_mib or 0, peak)
            r.phases["train"].peak_rss_mib = peak
            r.metrics.set(test_after={"accuracy": score})
            r.metrics.values.pop("test_best", None)
            out.append(r)
    return out


def test_seeds_of_one_configuration_are_one_bar_one_point_one_row_with_their_range(records):
    """Three seeds of sensitive and of random are drawn as one bar (the median peak, whiskers at the lowest
    and highest), one point (the mean test score, the median peak, bars their range) and one row of the
    step breakdown each, named with their number of seeds; a single-seed cell keeps its plain name."""
    from matplotlib.collections import PathCollection

    from zobench.report import views
    from zobench.report.cells import varying_axes
    from zobench.report.plots import memory_bars, memory_vs_accuracy, step_breakdown

    cells = views(seeded(records, {"sensitive": ((900, 0.70), (960, 0.76), (930, 0.61)),
                                   "random": ((910, 0.60), (905, 0.50), (990, 0.55))}))
    extras = varying_axes(cells)
    assert "seed" in extras

    ax = memory_bars(cells, extras).axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert sorted(names) == ["forward", "random 0.1% (3 seeds)", "sensitive 0.1% (3 seeds)"]
    heights = {n: p.get_height() for n, p in zip(names, ax.patches)}
    assert heights["sensitive 0.1% (3 seeds)"] == 930 and heights["random 0.1% (3 seeds)"] == 910
    whiskers = sorted(tuple(sorted(seg[:, 1])) for c in ax.collections for seg in c.get_segments()
                      if len(seg) == 2 and seg[0][0] == seg[1][0])  # the vertical error bars
    assert (900, 960) in whiskers and (905, 990) in whiskers

    ax = memory_vs_accuracy(cells, extras).axes[0]
    centres = sorted(tuple(map(float, c.get_offsets()[0])) for c in ax.collections if isinstance(c, PathCollection))
    assert [v for point in centres for v in point] == pytest.approx(
        [910.0, 100 * (0.60 + 0.50 + 0.55) / 3, 930.0, 100 * (0.70 + 0.76 + 0.61) / 3])

    ax = step_breakdown(cells, extras).axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert len(rows) == 3 and sum("(3 seeds)" in t for t in rows) == 2


def test_every_method_has_a_colour_and_a_place_of_its_own():
    """Plots tell methods apart by colour and list them by order: two methods sharing either (QZO and QuZO
    once did) are one method to a reader of the plot."""
    from zobench.report.figure import color
    from zobench.spec.catalog import METHOD_INFO

    names = [m.name for m in METHOD_INFO]
    assert len({color(n) for n in names}) == len(names)
    assert len({m.order for m in METHOD_INFO}) == len(names)


def _at_best(rec: CellRecord, dev, test) -> CellRecord:
    """``rec`` scored at a best dev step (dev and test accuracies; None: left as it is)."""
    if dev is not None:
        rec.metrics.set(best_dev={"accuracy": dev}, test_best={"accuracy": test}, best_step=100)
    return rec


def test_the_over_seeds_table_pools_a_configurations_seeds(records):
    """Three seeds of sensitive: one row with the mean, sd and range of their test scores and the median of
    their peaks; a suite of one seed a configuration has no such table (the golden report shows none)."""
    import statistics

    from zobench.report import views
    from zobench.report.cells import varying_axes
    from zobench.report.tables import limit_ratio, seeds_table

    assert limit_ratio(0.98) == "1.00 at limit (0.98)" and limit_ratio(1.204) == "1.20"  # a step makes 2 forwards
    cells = views(seeded(records, {"sensitive": ((900, 0.70), (960, 0.76), (930, 0.61))}))
    lines = seeds_table(cells, varying_axes(cells))
    row = next(line for line in lines if line.startswith("| sensitive"))
    sd = 100 * statistics.stdev([0.70, 0.76, 0.61])
    assert f"| 3 | 69.0 ± {sd:.1f} (61.0-76.0) | 930 (900-960) |" in row, row
    assert lines[0] == "## Over seeds" and "after training" in "\n".join(lines)
    assert "dev % at best" not in "\n".join(lines)  # no best dev step: no dev column
    # Scored at the best dev step: the dev score that chose it beside the test score there
    best = views([_at_best(r, dev, test) for r, dev, test in zip(
        seeded(records, {"sensitive": ((900, 0.70), (960, 0.76), (930, 0.61))}), (None, 0.80, 0.84, 0.77),
        (None, 0.70, 0.76, 0.61))])
    lines = seeds_table(best, varying_axes(best))
    assert "| test % at best dev, mean ± sd (min-max) | dev % at best, mean |" in lines[4]
    row = next(line for line in lines if line.startswith("| sensitive"))
    assert f"| 3 | 69.0 ± {sd:.1f} (61.0-76.0) | 80.3 | 930 (900-960) |" in row, row
    assert seeds_table(views(records), varying_axes(views(records))) == []
    assert "## Over seeds" not in GOLDEN.read_text(encoding="utf-8")


def test_step_over_float_is_marked_where_either_cell_trained_beside_other_work(records):
    """The quantization table's step / float divides two cells' seconds taken at different times: a pair
    where either ran on a loaded machine says so."""
    from zobench.report import views
    from zobench.report.cells import varying_axes
    from zobench.report.quant_table import quant_table

    def row(recs):
        cells = views(recs)
        return next(line for line in quant_table(cells, varying_axes(cells)) if line.startswith("| sensitive | nf4"))

    pair = [copy.deepcopy(r) for r in records if r.labels.get("method") == "sensitive"]
    for r in pair:
        r.phases["train"].other_cpus = 0.0
    assert "(loaded)" not in row(pair)
    next(r for r in pair if r.labels["quant"] == "none").phases["train"].other_cpus = 1.2  # the float twin
    assert "(loaded)" in row(pair) and "machines differ" not in row(pair)
    # the float twin ran on another CPU: the ratio divides two machines' seconds, and says so
    twin = next(r for r in pair if r.labels["quant"] == "none")
    twin.env = {**twin.env, "cpu": "Other CPU"}
    assert "(loaded; machines differ)" in row(pair)


def test_a_method_that_trains_quantized_weights_only_is_set_beside_float_sensitive_and_says_so(records):
    """QZO has no float cell of its own: its row compares with float sensitive of the same settings, and a
    column names that cell; where every quantized cell has its own method's float twin, no such column. A
    method that runs in float too (random) is never given a stand-in."""
    from zobench.report import views
    from zobench.report.cells import varying_axes
    from zobench.report.quant_table import quant_table

    def table(recs):
        cells = views(recs)
        return quant_table(cells, varying_axes(cells))

    pair = [copy.deepcopy(r) for r in records if r.labels.get("method") == "sensitive"]
    assert not any("float cell" in line for line in table(pair))
    qzo = copy.deepcopy(next(r for r in pair if r.labels["quant"] == "nf4"))
    qzo.cell_id, qzo.labels["method"], qzo.config["method"] = "qzo-nf4", "qzo", "qzo"
    qzo.phases["train"].peak_rss_mib = 450.0
    qzo.metrics.set(test_after={"accuracy": 0.55})
    lines = table(pair + [qzo])
    header = next(line for line in lines if line.startswith("| method"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = dict(zip(cols, [c.strip() for c in next(line for line in lines if line.startswith("| qzo")).strip("|")
                          .split("|")]))
    float_sensitive = next(r for r in pair if r.labels["quant"] == "none")
    assert row["float cell"] == "sensitive 0.1%"
    assert row["peak / float"] == f"{450.0 / float_sensitive.phases['train'].peak_rss_mib:.2f}"
    assert row["vs float (points)"] == f"{100 * (0.55 - float_sensitive.metrics.accuracy('test_after')):+.1f}"
    assert "set beside the float cell of `sensitive`" in "\n".join(lines)
    # random can run in float: a suite that did not run it there has no float cell for it, not a stand-in
    random = copy.deepcopy(qzo)
    random.cell_id, random.labels["method"], random.config["method"] = "random-nf4", "random", "random"
    lines = table(pair + [qzo, random])
    assert next(line for line in lines if line.startswith("| random")).split("|")[4].strip() == "-"
    from zobench.spec.catalog import METHOD_INFO
    assert {m.name for m in METHOD_INFO if m.quantized_only} == {"qzo", "quzo"}


def test_the_clip_table_counts_the_steps_a_clip_bound_from_the_trajectory(tmp_path):
    """QZO's trajectory keeps g after its clip, so |g| = C is a step the clip bound; a method that does not read
    clip_threshold (every config carries its default) gets no row, nor does a trajectory that is not numbers."""
    def rec(cell_id, method, trajectory, **labels):
        r = CellRecord(cell_id, status="ok", labels={"method": method, "quant": "nf4-plain", **labels},
                       config={"method": method, "quant": "nf4-plain", "clip_threshold": 5.0, "lr": 1e-3})
        r.metrics.set(trajectory=trajectory)
        return r

    records = [rec("a", "qzo", [[[1, 5.0]], [[2, -5.0]], [[3, 1.0]], [[4, -2.5]]]),
               rec("b", "qzo", [[[1, 5.0]], [[2, 0.5]]], stage="pilot", lr=1e-2),
               rec("c", "quzo", [[[1, 7.0]]]),
               rec("d", "qzo", [[[1, "5.0"]]], seed=1)]
    md = render_report(records, tmp_path / "r.md").read_text(encoding="utf-8").splitlines()
    head = md.index("## Clipped directional derivatives") + 4

    def cells(line):  # split on the table's pipes, not on a header's escaped \|
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip("|"))]

    cols = cells(md[head])
    rows = [dict(zip(cols, cells(line))) for line in md[head + 2:md.index("", head)]]
    assert "stage" not in cols and {r["method"] for r in rows} == {"qzo"} and len(rows) == 2
    cell, pilot = sorted(rows, key=lambda r: r["run"])
    assert (cell["run"], cell["clip C"], cell["g clipped"], cell["median |g|"], cell["largest |g| under C"]) == (
        "cell", "5.00", "2 of 4 (50.0%)", "3.75", "2.50")
    assert (pilot["run"], pilot["g clipped"], pilot["largest |g| under C"]) == ("lr pilot", "1 of 2 (50.0%)", "0.50")
