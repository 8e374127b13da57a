"""``zobench influence cache ... --executor ray [--address ...] [--workers N]``: sketch on a Ray cluster.

One actor per worker (a GPU each where the cluster has GPUs, else a share of a node's CPUs) loads the model
once and sketches the chunks of rows the driver hands it; the rows come back as float16 arrays and only the
driver writes the store (rows, then their done flags, as ``SketchStore.write`` does), so no two processes
ever write one memory map. Each worker has two chunks in flight so it never waits for the driver.

A dead actor is restarted by Ray (``max_restarts``) and its chunk goes back in the queue; a killed driver
leaves only whole rows with their flags, and the next run sketches what is missing. Throughput is reported
per worker (rows over the seconds it spent sketching) and in total (rows over the driver's wall time).

Where it stops scaling: every row crosses the network to the driver, and the driver writes them. A row is
k float16 values (128 KiB at k = 65,536), so 1,000,000 rows are 122 GiB through one process.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict

import numpy as np
import torch

from zobench.errors import UserError
from zobench.gates.ray import connect, nodes
from zobench.influence.session import InfluenceSpec, Session, sketch_examples

CHUNK = 8            # rows per task (the local build's WRITE_EVERY): a lost actor costs seconds
IN_FLIGHT = 2        # chunks queued per actor
MAX_RESTARTS = 3     # per actor, before the run gives that worker up


class SketchWorker:
    """The actor: a Session (model, scope, sketcher) built once; ``sketch(rows, examples)`` sketches them.

    The examples travel with their chunk, so no actor holds the whole dataset (and its constructor takes
    nothing from the object store that a restart would need)."""

    def __init__(self, spec: dict, device: str, threads: int):
        if threads:
            torch.set_num_threads(threads)
        self.session = Session(InfluenceSpec(**spec), device)

    def k(self) -> int:
        return self.session.sketcher.cfg.k

    def sketch(self, rows: list[int], examples: list[dict]) -> tuple[list[int], np.ndarray, int, float]:
        """(rows, float16 [len(rows), k], tokens, seconds) for ``examples``, the rows' examples in order."""
        start = time.perf_counter()
        values, tokens = sketch_examples(self.session, examples)
        # The store's own conversion (float32, then float16), done here so half the bytes travel.
        out = values.detach().to("cpu").float().numpy().astype(np.float16)
        return rows, out, tokens, time.perf_counter() - start


def plan(ray, workers: int | None, device: str) -> tuple[int, dict]:
    """How many actors and what each asks for: a GPU each on a GPU cluster, else a share of a node's CPUs."""
    alive = nodes(ray)
    gpus = sum(n["gpus"] for n in alive)
    if device.startswith("cuda") or (device == "auto" and gpus):
        if not gpus:
            raise UserError(f"--device {device}: the Ray cluster has no GPU")
        n = workers or gpus
        return n, {"num_gpus": 1, "num_cpus": 1, "threads": 1, "device": "cuda"}
    n = workers or len(alive)
    per_node = -(-n // len(alive))
    threads = max(1, min(a["cpus"] for a in alive) // per_node)
    return n, {"num_gpus": 0, "num_cpus": threads, "threads": threads, "device": "cpu"}


def fill_with_ray(spec, examples: list[dict], begin, workers: int | None, device: str, address: str | None,
                  progress) -> dict:
    """Sketch the missing rows on Ray actors and write them into the store; returns the build counters.

    ``begin(k)`` opens the store once the actors know the sketch size: (store, missing rows, built)."""
    ray, started_here = connect(address)
    try:
        return _fill(ray, spec, examples, begin, workers, device, progress)
    finally:
        if started_here:
            ray.shutdown()


def _fill(ray, spec, examples, begin, workers, device, progress) -> dict:
    n, res = plan(ray, workers, device)
    actor = ray.remote(SketchWorker).options(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"],
                                            max_restarts=MAX_RESTARTS, max_task_retries=0)
    actors = [actor.remote(asdict(spec), res["device"], res["threads"]) for _ in range(n)]
    store, missing, built = begin(ray.get(actors[0].k.remote()))
    total, already = len(examples), len(examples) - len(missing)
    if not missing:
        return {"nothing_to_do": True, "already": already, "built": built}
    chunks = deque(missing[i:i + CHUNK] for i in range(0, len(missing), CHUNK))
    inflight: dict = {}
    per = [{"worker": w, "rows": 0, "tokens": 0, "sketch_s": 0.0, "lost_chunks": 0} for w in range(n)]
    alive, done = set(range(n)), already
    start = time.perf_counter()
    while chunks or inflight:
        for w in sorted(alive):
            while chunks and sum(1 for a, _ in inflight.values() if a == w) < IN_FLIGHT:
                rows = chunks.popleft()
                inflight[actors[w].sketch.remote(rows, [examples[i] for i in rows])] = (w, rows)
        if not inflight:
            raise UserError(f"influence cache: every Ray worker died {MAX_RESTARTS + 1} times; the rows "
                            f"written so far are kept, run again to resume")
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        w, rows = inflight.pop(ref)
        try:
            rows, values, tokens, seconds = ray.get(ref)
        except ray.exceptions.RayActorError:  # the actor died (Ray restarts it): its chunk is done again
            chunks.appendleft(rows)
            per[w]["lost_chunks"] += 1
            if per[w]["lost_chunks"] > MAX_RESTARTS:
                alive.discard(w)
            continue
        store.write(np.asarray(rows), values)  # rows first, then their flags
        per[w]["rows"] += len(rows)
        per[w]["tokens"] += tokens
        per[w]["sketch_s"] += seconds
        done += len(rows)
        if progress:
            progress(done, total)
    for p in per:
        p["examples_per_s"] = p["rows"] / p["sketch_s"] if p["sketch_s"] else None
    return {"rows": sum(p["rows"] for p in per), "tokens": sum(p["tokens"] for p in per), "k": store.k,
            "already": already, "workers": n, "executor": "ray", "per_worker": per, "built": built,
            "lost_chunks": sum(p["lost_chunks"] for p in per), "fill_s": time.perf_counter() - start}
