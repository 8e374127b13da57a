"""``make gpu-check``: what a GPU user sees, on one GPU, in at most 9 minutes; ``make gpu-plan`` (this with
``--dry-run``) prints the plan on any machine.

In order, stopping cleanly before a step that no longer fits the time left:
  0. the whole Llama-2-7B sensitive 0.1% + NF4 cell, every phase (load, mask, quantize, eval, warm-up, train)
     with its device-level peak: suites/llama7b.yaml's SST-2 cell at the suites' batch with its forward
     reference (-> ``llama7b.jsonl``), then suites/llama7b-cpu.yaml's cell on the GPU
     (suites/llama7b-cuda.yaml -> ``llama7b-cuda.jsonl``); these come first, the rest fills the time left;
  1. ``pytest -m gpu``: per-phase CUDA peaks, the NVML sampler against a known allocation, NF4 on CUDA
     against the CPU (also with merged sparse values), sparse restore bit-exact in fp16/bf16, random 7B
     weights built on the GPU;
  2. the benches, each while it fits: ``bench/new_batch.py`` (a forward on a batch not seen before against
     the same batch again, with and without cuDNN attention, -> ``new_batch_cuda.json``),
     ``bench/mask_memory.py``, ``bench/topk_memory.py`` and ``bench/sparse_pass_ops.py`` (the mask phase's
     allocator peaks stage by stage, the global top-k's memory before and now, a 224-tensor sparse
     perturbation a pass per tensor and in one pass), ``bench/sparse_delta.py --device cuda`` at the suite's
     batch (each way of the dense-and-sparse layer against the quantized layer, -> ``sparse_delta_cuda.json``),
     then this node's framework floor for the estimator (``framework("cuda")``, cached like the CPU one,
     -> ``framework_cuda.json``);
  3. the cells of ``suites/gpu-check.yaml`` (Llama-2-7B from random weights, the suite's batch, ~10 timed
     steps), forward and sensitive in fp16, then forward, sensitive and random on NF4, full ZO last;
  4. ``results/gpu/gpu-check.jsonl``, ``reports/gpu-check.md`` (device-level, allocated and reserved peaks, each
     beside its estimate) and the suite's budgets checked (at most 5 GiB for sensitive 0.1% + NF4).

It runs with the node's own Python and packages (torch with CUDA, transformers 5.x, ...). What the node
lacks comes from ``gpu-bundle/`` (``scripts/gpu_bundle.sh`` prepares it elsewhere): bitsandbytes for the
node's CUDA only, pytest, and the embedded tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "gpu-bundle"
SUITE = ROOT / "suites" / "gpu-check.yaml"
BUDGET_S = 540
# The whole 7B cells, before anything else: (suite, --only selector, planned seconds). Measured on the H200
# (2026-12-04, two runs): llama7b.yaml's two cells 183 and 219 s (the second measured the node's framework
# floor first, ~20 s; mask phase ~70 s, quantize ~15 s each), llama7b-cuda.yaml's 87 and 113 s.
WHOLE_CELLS = [
    ("suites/llama7b.yaml", "quant=nf4,method=sensitive|forward,task=sst2", 220),
    ("suites/llama7b-cuda.yaml", None, 115),
]
# Planned seconds of the steps before the cells. Measured on an H200 (2026-11-30): pytest -m gpu 21 s
# (6 tests, a 7B init among them), the sparse-delta bench 20 s, one tiny cell 13-21 s (the floor: two).
PYTEST_S = 35
FLOOR_S = 40
# Benches, run with a timeout of twice their plan, each while it fits the time left (before the cells of
# gpu-check.yaml, which two H200 runs have measured): (step name, what, planned seconds, script and
# arguments, results file). new_batch first: on the H200 a forward at a new sequence length cost ~40 ms of
# cuDNN attention planning (tiny Llama); its no-cuDNN variant has not run on a GPU yet, and cells now warm
# their shapes before timing (CellConfig.shape_warmup). mask_memory: 3 variants of ~8 s each plus start-up,
# 74 s in all on the H200 (2026-12-04).
BENCHES = [
    ("bench", "bench/new_batch.py --device cuda", 30,
     ["bench/new_batch.py", "--device", "cuda", "--dtype", "float16"], "new_batch_cuda.json"),
    ("bench", "bench/mask_memory.py --device cuda", 75,
     ["bench/mask_memory.py", "--device", "cuda"], "mask_memory_cuda.json"),
    ("bench", "bench/topk_memory.py --device cuda", 20,
     ["bench/topk_memory.py", "--device", "cuda"], "topk_memory_cuda.json"),
    ("bench", "bench/sparse_pass_ops.py --device cuda", 15,
     ["bench/sparse_pass_ops.py", "--device", "cuda"], "sparse_pass_ops_cuda.json"),
    ("bench", "bench/sparse_delta.py --device cuda", 25,
     ["bench/sparse_delta.py", "--device", "cuda", "--dtype", "float16", "--tokens", str(16 * 2 * 256),
      "--rounds", "5"], "sparse_delta_cuda.json"),
]
# Planned seconds per cell until one was measured here (then its measured wall time counts): process
# start and imports ~15 s, 7B random init on the GPU ~10 s, NF4 quantization ~25 s, sensitive mask
# (8 x 256 calibration tokens, one backward) ~15 s, test accuracy before/after on 32 examples ~5 s,
# 12 steps of two forwards over 16 x 2 x 256 tokens ~10 s.
GUESS_S = {("none", "forward"): 40, ("none", "sensitive"): 55, ("none", "full"): 55,
           ("nf4", "forward"): 60, ("nf4", "sensitive"): 75, ("nf4", "random"): 70}
ORDER = [("none", "forward"), ("none", "sensitive"), ("nf4", "forward"), ("nf4", "sensitive"),
         ("nf4", "random"), ("none", "full")]


def _use_bundle() -> list[str]:
    """Put gpu-bundle/ on the path of this process and of every cell; returns what it provides."""
    provided = []
    site = BUNDLE / "site"
    paths = [str(ROOT)] + ([str(site)] if site.is_dir() else [])
    if site.is_dir():
        names = sorted(p.name for p in site.iterdir() if p.is_dir() and "." not in p.name and p.name[0] != "_")
        provided.append(f"packages: {', '.join(names)}")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    sys.path[:0] = paths
    if (BUNDLE / "tokenizer" / "tokenizer.json").exists():
        os.environ.setdefault("ZOBENCH_TOKENIZER", str(BUNDLE / "tokenizer"))
        provided.append("tokenizer")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return provided


def _cells():
    from zobench.spec.matrix import select_cells
    from zobench.spec.suite import load_suite

    suite = load_suite(SUITE)
    by = {(c.config.quant, c.config.method): c for c in select_cells(suite)}
    missing = set(by) ^ set(ORDER)
    if missing:
        raise SystemExit(f"gpu-check: {SUITE.name} and ORDER disagree on {sorted(missing)}")
    return suite, [by[k] for k in ORDER]


def _measured(out: Path) -> dict[str, float]:
    """Wall seconds of cells already measured here (latest ok record per cell)."""
    path = out / "gpu-check.jsonl"
    walls = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("status") == "ok" and r.get("wall_s"):
                walls[r["cell_id"]] = float(r["wall_s"])
    return walls


def plan(out: Path) -> list[tuple[str, str, float, str]]:
    """[(step, what, seconds, "measured" | "planned")] in running order."""
    _, cells = _cells()
    walls = _measured(out)
    steps = [*[("whole cell", f"{suite}" + (f" --only {only}" if only else ""), secs, "planned")
               for suite, only, secs in WHOLE_CELLS],
             ("pytest -m gpu", "tests/test_gpu.py", PYTEST_S, "planned"),
             *[(name, what, secs, "planned") for name, what, secs, _, _ in BENCHES],
             ("floor", "framework footprint on cuda", FLOOR_S, "planned")]
    for c in cells:
        key = (c.config.quant, c.config.method)
        s, how = (walls[c.cell_id], "measured") if c.cell_id in walls else (GUESS_S[key], "planned")
        steps.append((f"cell {c.cell_id}", f"quant={key[0]} method={key[1]}", s, how))
    return steps


def node_report() -> list[str]:
    """What this node has for the check, one line each."""
    lines = []
    try:
        import torch

        cuda = torch.cuda.is_available()
        lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}: "
                     + (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else "no GPU"))
    except ImportError:
        lines.append("torch: missing")
    for mod in ("transformers", "bitsandbytes", "pytest", "pynvml"):
        try:
            m = __import__(mod)
            lines.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # bitsandbytes without its CUDA library raises more than ImportError
            lines.append(f"{mod}: missing ({type(e).__name__})")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print what would run and its time plan")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu"))
    ap.add_argument("--reports", default=str(ROOT / "reports"))
    args = ap.parse_args()
    start = time.monotonic()
    provided = _use_bundle()
    out = Path(args.out)
    steps = plan(out)
    total = sum(s for _, _, s, _ in steps)
    print(f"gpu-check: {len(steps)} steps, {total:.0f} s planned of a {args.budget_s:.0f} s budget"
          + (f"; gpu-bundle/ gives {'; '.join(provided)}" if provided else "; no gpu-bundle/"))
    for name, what, s, how in steps:
        print(f"  {s:5.0f} s  {how:<8}  {name}  {what}")
    for line in node_report():
        print(f"  node: {line}")
    fits, used = [], 0.0
    for name, what, s, _ in steps:
        used += s
        fits.append(used <= args.budget_s)
    if not all(fits):
        first_out = steps[fits.index(False)]
        print(f"  the budget ends before: {first_out[0]}  {first_out[1]} (and what follows)")
    if args.dry_run:  # the whole cells and the GPU tests must fit; the rest fills what is left
        return 0 if all(fits[:len(WHOLE_CELLS) + 1]) else 1

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing run (use make gpu-plan for the plan)", file=sys.stderr)
        return 2
    left = lambda: args.budget_s - (time.monotonic() - start)  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    for suite, only, secs in WHOLE_CELLS:
        if left() < secs:
            print(f"gpu-check: skipped {suite}: {left():.0f} s left, it needs ~{secs} s", flush=True)
            continue
        argv = [sys.executable, "-m", "zobench.cli", "run", suite, "--out", str(out), "--reports",
                str(args.reports), "--resume", *(["--only", only] if only else [])]
        try:
            w = subprocess.run(argv, cwd=ROOT, timeout=max(secs, left() - PYTEST_S)).returncode
        except subprocess.TimeoutExpired:
            w = "timed out"
        print(f"gpu-check: {suite} exit {w} ({args.budget_s - left():.0f} s so far)", flush=True)
    tests = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests" / "test_gpu.py"),
             "-p", "no:cacheprovider"]
    if left() < PYTEST_S:
        print(f"gpu-check: stopped before pytest -m gpu: {left():.0f} s left", flush=True)
        return 0
    rc = subprocess.run(tests, cwd=ROOT, timeout=max(30, left() - 60)).returncode
    print(f"gpu-check: pytest -m gpu exit {rc} ({args.budget_s - left():.0f} s so far)", flush=True)
    first = len(steps) - len(ORDER)  # the cells' steps follow the tests, the bench and the floor
    for _, what, secs, argv, result in BENCHES:  # each while it fits; the cells take what is left
        if left() < secs:
            print(f"gpu-check: skipped {what}: {left():.0f} s left", flush=True)
            continue
        try:
            b = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:], "--json", str(out / result)],
                               cwd=ROOT, timeout=2 * secs).returncode
        except subprocess.TimeoutExpired:
            b = "timed out"
        print(f"gpu-check: {what} exit {b} ({args.budget_s - left():.0f} s so far)", flush=True)
    from zobench.analysis.calibration import needs_measuring

    if left() >= (FLOOR_S if needs_measuring("cuda") else 5):  # the whole cells measured it first: then cached
        from zobench.driver import calibrate

        floor = calibrate("cuda")  # measured here and cached: the cells' records then carry estimates on it
        (out / "framework_cuda.json").write_text(json.dumps(floor, indent=1) + "\n")
        print(f"gpu-check: framework floor on cuda {floor['framework_mib']:.0f} MiB ({floor['source']}; "
              f"{args.budget_s - left():.0f} s so far)", flush=True)

    from zobench.driver import run_suite
    from zobench.executors.local import LocalExecutor
    from zobench.report import render_results_file

    suite, cells = _cells()
    ran = []
    for (name, what, s, _), cell in zip(steps[first:], cells):
        if left() < s:
            print(f"gpu-check: stopped before {what}: {left():.0f} s left, it needs ~{s:.0f} s", flush=True)
            break
        print(f"gpu-check: {what} ({left():.0f} s left)", flush=True)
        run_suite(suite, out, resume=True, executor=LocalExecutor(), cells=[cell])
        ran.append(cell.cell_id)
    results = out / "gpu-check.jsonl"
    if results.exists():
        print(f"report: {render_results_file(results, Path(args.reports) / 'gpu-check.md')}")
        check = subprocess.run([sys.executable, "-m", "zobench.cli", "check", str(results), "--suite",
                                str(SUITE)], cwd=ROOT)
        print(f"gpu-check: budgets exit {check.returncode}; {len(ran)} of {len(cells)} cells ran; "
              f"{args.budget_s - left():.0f} s in all")
    return rc


if __name__ == "__main__":
    sys.exit(main())
