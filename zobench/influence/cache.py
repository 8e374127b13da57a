"""Fill a sketch store: one sketched gradient per training example, resumable, in worker processes.

Each worker loads its own model and rebuilds the same projector from the spec, takes a disjoint set of
the store's missing rows (row i goes to worker i mod W), and writes them in small groups; a row's done
flag is set only after its values are flushed (``SketchStore.write``), so a killed run resumes at the
first row that is not on disk. On CUDA machines give each worker its own device; on a CPU, workers
split the cores (``torch.set_num_threads``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from queue import Empty

import numpy as np
import torch

from zobench.errors import UserError
from zobench.files import atomic_write, parse_json, read_json, text_lines
from zobench.influence.ray_cache import fill_with_ray
from zobench.influence.session import InfluenceSpec, Session, sketch_examples
from zobench.influence.store import SketchStore, dataset_hash
from zobench.procs import die_with_parent

WRITE_EVERY = 8  # rows per flush: small enough that a kill loses seconds of work


def cache_meta(spec: InfluenceSpec, examples: list[dict]) -> dict:
    return {**spec.meta(), "dataset": dataset_hash(examples)}


def _fill(session: Session, examples: list[dict], out: str, rows: list[int],
          report: Callable[[int], None] | None = None, limit: int | None = None) -> dict:
    """Compute and write ``rows`` (at most ``limit`` of them) in groups of WRITE_EVERY; returns counters."""
    store = SketchStore.open_or_create(out, cache_meta(session.spec, examples), len(examples),
                                       session.sketcher.cfg.k)
    rows = rows[:limit] if limit is not None else rows
    done, tokens = 0, 0
    for at in range(0, len(rows), WRITE_EVERY):
        group = rows[at:at + WRITE_EVERY]
        values, n_tokens = sketch_examples(session, [examples[i] for i in group])
        store.write(np.asarray(group), values)
        done, tokens = done + len(group), tokens + n_tokens
        if report:
            report(len(group))
    return {"rows": done, "tokens": tokens, "dim": session.scope.dim, "k": session.sketcher.cfg.k}


def _worker(spec_dict: dict, examples: list[dict], out: str, rows: list[int], threads: int, device: str,
            queue, parent: int) -> None:
    die_with_parent(parent)  # a cache killed outright leaves no worker writing on
    try:
        if threads:
            torch.set_num_threads(threads)
        stats = _fill(Session(InfluenceSpec(**spec_dict), device), examples, out, rows,
                      report=lambda n: queue.put(("rows", n)))
        queue.put(("done", stats))
    except BaseException as e:  # the parent reports it; the rows written so far stay valid
        queue.put(("error", f"{type(e).__name__}: {e}"))


def build_cache(spec: InfluenceSpec, examples: list[dict], out: str | Path, workers: int = 1,
                device: str = "cpu", progress: Callable[[int, int], None] | None = None,
                limit: int | None = None, session: Session | None = None, executor: str = "local",
                address: str | None = None) -> dict:
    """Fill the store at ``out`` for ``examples``; returns {rows, seconds, examples_per_s, ...}.

    ``progress(done, total)`` is called as rows land. ``limit`` stops after that many rows (tests use it
    to simulate a killed run). A given ``session`` (same spec) is reused by a single-process run.
    ``executor="ray"`` sketches on Ray actors (``zobench.influence.ray_cache``; ``workers=None``: one per
    GPU, else one per node) and the model is never loaded in this process.
    """
    out = str(out)
    if executor == "ray":  # its time includes starting the actors and their model loads
        start = time.perf_counter()
        return _finish(out, start, fill_with_ray(spec, examples, lambda k: _begin(spec, examples, out, k),
                                                 workers, device, address, progress))
    if executor != "local":
        raise UserError(f"--executor {executor}: expected local or ray")
    session = session or Session(spec, device)
    start = time.perf_counter()  # the model load is not part of a local build's throughput
    store, missing, built = _begin(spec, examples, out, session.sketcher.cfg.k)
    total, already = len(examples), len(examples) - len(missing)
    if not missing:  # nothing to do: report the throughput measured while it was built
        return _nothing_to_do(built, already)
    workers = min(workers or 1, len(missing))  # a worker with no rows to fill would load the model for nothing
    if workers <= 1:
        done = [already]

        def report(n):
            done[0] += n
            if progress:
                progress(done[0], total)

        stats = _fill(session, examples, out, missing, report, limit)
        stats.update(already=already, workers=1)
    else:
        stats = _run_workers(spec, examples, out, missing, workers, device, progress, already, total)
    return _finish(out, start, dict(stats, built=built))


def _begin(spec: InfluenceSpec, examples: list[dict], out: str, k: int):
    """Open (or create) the store and its sidecars: (store, missing rows, what earlier runs built)."""
    # Opening here checks a reused store's metadata before any work starts.
    store = SketchStore.open_or_create(out, cache_meta(spec, examples), len(examples), k)
    _write_sidecars(Path(out), spec, examples)
    missing = [int(i) for i in store.missing()]
    built = _read_build(Path(out)) if len(missing) < len(examples) else {"rows": 0, "cache_s": 0.0}
    return store, missing, built


def _nothing_to_do(built: dict, already: int) -> dict:
    return {"rows": 0, "cache_s": 0.0, "examples_per_s": _rate(built), "already": already, "workers": 0}


def _finish(out: str, start: float, stats: dict) -> dict:
    """Total seconds and throughput, summed into build.json over every run that built the cache."""
    built = stats.pop("built")
    if stats.get("nothing_to_do"):
        return _nothing_to_do(built, stats["already"])
    stats["cache_s"] = time.perf_counter() - start
    stats["examples_per_s"] = _rate(stats)
    total_built = {"rows": built["rows"] + stats["rows"], "cache_s": built["cache_s"] + stats["cache_s"],
                   "workers": stats["workers"]}
    atomic_write(Path(out) / BUILD, json.dumps(total_built) + "\n", "influence cache file")
    return stats


BUILD = "build.json"  # rows sketched and seconds spent, summed over the runs that built the cache


def _rate(stats: dict) -> float | None:
    return stats["rows"] / stats["cache_s"] if stats.get("rows") and stats.get("cache_s") else None


def _read_build(out: Path) -> dict:
    try:
        d = read_json(out / BUILD, "influence cache build record")
        return {"rows": int(d["rows"]), "cache_s": float(d["cache_s"])}
    except (UserError, ValueError, KeyError, TypeError):  # a cache from before build.json: no figure
        return {"rows": 0, "cache_s": 0.0}


def _run_workers(spec, examples, out, missing, workers, device, progress, already, total) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers) if device == "cpu" else 0
    procs = []
    for w in range(workers):
        dev = f"cuda:{w % torch.cuda.device_count()}" if device.startswith("cuda") else device
        p = ctx.Process(target=_worker, args=(asdict(spec), examples, out, missing[w::workers], threads, dev,
                                              queue, os.getpid()), daemon=True)
        p.start()
        procs.append(p)
    done, finished, errors, stats = already, 0, [], []
    while finished < workers:
        try:
            kind, value = queue.get(timeout=2.0)
        except Empty:  # a worker killed outright sends nothing: notice it instead of waiting forever
            dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead and queue.empty():
                for p in procs:
                    p.kill()
                raise UserError(f"influence cache: a worker died ({death(dead[0].exitcode)}); rows written so far "
                                f"are kept, run again to resume") from None
            continue
        if kind == "rows":
            done += value
            if progress:
                progress(done, total)
        else:
            finished += 1
            (errors if kind == "error" else stats).append(value)
    for p in procs:
        p.join()
    if errors:
        raise UserError(f"influence cache: a worker failed ({errors[0]}); rows written so far are kept, "
                        f"run again to resume")
    return {"rows": sum(s["rows"] for s in stats), "tokens": sum(s["tokens"] for s in stats),
            "dim": stats[0]["dim"], "k": stats[0]["k"], "already": already, "workers": workers}


def death(code: int | None) -> str:
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"


def _write_sidecars(out: Path, spec: InfluenceSpec, examples: list[dict]) -> None:
    """spec.json (with paths, for `zobench influence query`) and the examples, so a query can show them."""
    for name, text in (("spec.json", json.dumps(asdict(spec), indent=1)),
                       ("examples.jsonl", "".join(json.dumps(e) + "\n" for e in examples))):
        atomic_write(out / name, text, "influence cache file")


def load_cache_dir(path: str | Path) -> tuple[InfluenceSpec, list[dict]]:
    """The spec and examples a cache was built from, checked as the command line's are (a cache is data
    from someone else: docs/security.md)."""
    path = Path(path)
    if not (path / "spec.json").is_file():
        raise UserError(f"{path}: not an influence cache made by `zobench influence cache` (no spec.json)")
    raw = read_json(path / "spec.json", "influence cache spec")
    if not isinstance(raw, dict):
        raise UserError(f"{path / 'spec.json'}: not an influence cache spec (expected a JSON object)")
    spec = InfluenceSpec.from_dict(raw, str(path / "spec.json"))
    examples = []
    for n, line in text_lines(path / "examples.jsonl", "influence cache examples"):
        if line.strip():
            row = parse_json(line, f"{path / 'examples.jsonl'}:{n}")
            if (not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("instruction", "output"))
                    or not isinstance(row.get("input", ""), str) or type(row.get("id")) not in (str, int)):
                raise UserError(f"{path / 'examples.jsonl'}:{n}: not an {{id, instruction, input, output}} row "
                                f"(id a string or a number, the others strings)")
            examples.append(row)
    if len({row["id"] for row in examples}) != len(examples):
        raise UserError(f"{path / 'examples.jsonl'}: two rows share an id")
    return spec, examples
