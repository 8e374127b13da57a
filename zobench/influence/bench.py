"""Run an influence suite: backdoor a fine-tune, cache sketched gradients, find the poison, measure cost.

Phases (each measured as a cell's are, by ``measure.phases``: wall time, peak memory, other load; their
outputs are reused on a re-run, keyed by the settings that made them):
    data       Alpaca sample; a fraction of it poisoned (trigger phrase -> a fixed absurd response)
    finetune   LoRA on the poisoned set; the attack must take: held-out triggered prompts answer with
               the absurd response, their clean twins do not
    cache      one sketch per training example (resumable, workers); throughput against a plain
               forward+backward of the same examples, interleaved in this run
    quality    triggered queries (prompt + the model's own generation) scanned against the cache:
               recall@k, precision@k and AUROC of the poisoned rows, for each nested K; clean controls;
               token-wise: the loss restricted to the response's hotword
    fidelity   sketched vs exact gradient scores (Spearman, top-k overlap) over a K sweep, with and
               without layer-wise normalization and the permutation
    cost       bytes per example, compression ratios (this scope; Llama-2-7B's full gradient), scan
               bytes/s against a plain copy of the same bytes, speedup against exact recomputation
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from zobench.analysis.architecture import architecture
from zobench.cell.delta import read
from zobench.cell.influence_record import InfluenceRecord
from zobench.cell.measures import now
from zobench.errors import UserError
from zobench.files import atomic_write, cache_dir
from zobench.influence import metrics as MX
from zobench.influence.cache import build_cache
from zobench.influence.fidelity import fidelity, subspace_vs_sketch
from zobench.influence.poison import (
    control_queries,
    generate,
    poison,
    success_rate,
    triggered_queries,
)
from zobench.influence.retrieve import query_sketch, scan, token_contributions
from zobench.influence.session import InfluenceSpec, Session
from zobench.influence.sketch import nest
from zobench.influence.store import SketchStore
from zobench.influence.train import fine_tune, fine_tune_config, summary
from zobench.measure.env import environment
from zobench.measure.machine import git_state
from zobench.measure.phases import phase as measure_phase
from zobench.spec.influence import InfluenceSuite
from zobench.tasks.instruction import format_prompt, load_alpaca
from zobench.tasks.responses import collate, response_loss


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _say(progress, msg: str) -> None:
    if progress:
        progress(msg)


def prepare_data(suite: InfluenceSuite) -> dict:
    pool = load_alpaca(suite.data_path(), n=suite.n_train + suite.queries, seed=suite.seed)
    clean, held = pool[:suite.n_train], pool[suite.n_train:]
    train, poisoned = poison(clean, suite.trigger, suite.response, suite.poison_fraction, seed=suite.seed)
    return {"train": train, "poisoned": poisoned,
            "triggered": triggered_queries(held, suite.trigger, suite.queries, suite.seed),
            "control": control_queries(held, suite.queries, suite.seed),
            "trigger": suite.trigger, "response": suite.response}


def finetune(suite: InfluenceSuite, data: dict, work: Path, progress=None) -> tuple[str, dict]:
    """The LoRA fine-tune on the poisoned set, a cell (``influence.train``) kept as a ``lora`` delta: the
    delta's folder and what the record says of it (the cell's record under ``cell``). Reused when the same
    settings made it before."""
    key = _key({"model": suite.model, "ft": suite.finetune, "data": [e.get("id") for e in data["train"]],
                "poisoned": data["poisoned"], "seed": suite.seed})
    delta_dir, stats_file = work / f"lora-{key}", work / f"lora-{key}.json"
    if stats_file.is_file() and (delta_dir / "adapter").is_dir():
        return str(delta_dir), dict(json.loads(stats_file.read_text()), reused=True)
    ft = suite.finetune
    cfg = fine_tune_config(suite.model, len(data["train"]), "lora", steps=ft["steps"], batch_size=ft["batch_size"],
                           lr=ft["lr"], max_length=ft["max_length"], seed=suite.seed, r=ft.get("r", 8),
                           alpha=ft.get("alpha", 16), save=str(delta_dir),
                           overwrite=True)  # a folder of its own work, named by these settings
    record = fine_tune(cfg, data["train"], lambda s, loss: _say(progress, f"finetune step {s} loss {loss:.3f}"))
    out = summary(record)
    stats = {"finetune_s": out["train_s"], "trainable": out["trainable"], "loss_first": out["loss_first"],
             "loss_last": out["loss_last"], "cell": record.to_json()}
    atomic_write(stats_file, json.dumps(stats), "fine-tune record")
    return str(delta_dir), dict(stats, reused=False)


def zo_arm(suite: InfluenceSuite, data: dict, work: Path, progress=None) -> dict:
    """The sparse-ZO arm: a ``zo.method`` fine-tune of the same poisoned set, a cell (``influence.train``)
    kept as a sparse delta; its sketches in the delta's own subspace (scope ``sensitive`` = the trained
    indices), and the same retrieval metrics as the LoRA arm. The delta is reused when the same settings
    made it before."""
    zo = suite.zo
    key = _key({"model": suite.model, "zo": zo, "data": [e.get("id") for e in data["train"]],
                "poisoned": data["poisoned"], "seed": suite.seed, "trigger": data["trigger"]})
    delta_dir = work / f"zo-delta-{key}"
    t0 = time.perf_counter()
    if (delta_dir / "train.json").is_file():
        trained = dict(json.loads((delta_dir / "train.json").read_text()), reused=True)
    else:
        _say(progress, f"zo: {zo['method']} {zo['density']:g}, {zo['steps']} steps")
        cfg = fine_tune_config(suite.model, len(data["train"]), zo["method"], steps=zo["steps"],
                               batch_size=zo["batch_size"], lr=zo["lr"], max_length=zo["max_length"],
                               seed=suite.seed, density=zo["density"], eps=zo["eps"], data_dir=suite.data_dir,
                               save=str(delta_dir), overwrite=True)  # a folder of its own work, named by these settings
        record = fine_tune(cfg, data["train"], lambda s, loss: _say(progress, f"zo step {s} loss {loss:.3f}")
                           if s % 50 == 0 else None)
        trained = {**summary(record), "cell": record.to_json()}
        atomic_write(delta_dir / "train.json", json.dumps(trained), "ZO arm record")
        trained["reused"] = False
    cache = {**suite.cache, "scope": "sensitive"}
    spec = InfluenceSpec.from_dict({"model": suite.model, "delta": str(delta_dir), "data_dir": suite.data_dir,
                                    **cache}, f"{suite.path}: zo")
    session = Session(spec)
    atk = attack(session, data)
    store_dir = work / f"cache-{_key(spec.meta())}"
    caching = build_cache(spec, data["train"], store_dir, workers=1, session=session,
                          progress=lambda d, t: _say(progress, f"zo cache {d}/{t}") if d % 100 == 0 or d == t else None)
    store = SketchStore.open(store_dir)
    ks = [k for k in suite.ks if k <= store.k] or [store.k]
    qual = quality(session, store, data, atk["generations"], atk["control_generations"], ks)
    qual.pop("query_sketches")
    return {"config": zo, "train": trained, "delta_kind": read(delta_dir)["kind"], "scope_dim": session.scope.dim,
            "attack": {k: atk[k] for k in ("triggered_success", "control_success", "example")},
            "caching": caching, "quality": qual, "wall_s": time.perf_counter() - t0}


def attack(session, data: dict, max_new_tokens: int = 16) -> dict:
    """Does the backdoor take? Greedy answers to held-out prompts with and without the trigger."""
    gens = generate(session.model, session.tokenizer, [_prompt(q) for q in data["triggered"]], max_new_tokens)
    ctrl = generate(session.model, session.tokenizer, [_prompt(q) for q in data["control"]], max_new_tokens)
    return {"triggered_success": success_rate(gens, data["response"]),
            "control_success": success_rate(ctrl, data["response"]),
            "generations": gens, "control_generations": ctrl,
            "example": {"prompt": data["triggered"][0]["instruction"], "generation": gens[0]}}


def _prompt(example: dict) -> str:
    return format_prompt(example)


def plain_step_seconds(session, examples: list[dict], reduce=np.median) -> float:
    """Median (or another ``reduce``, e.g. the sum) of the seconds of a plain forward+backward (no hooks,
    no sketch) of each of ``examples``."""
    times = []
    with session.streamer.detached():
        for ex in examples:
            ids, attn, labels = collate([session.encode(ex)], session.tokenizer.pad_token_id)
            t = time.perf_counter()
            with torch.enable_grad():
                response_loss(session.model, ids, attn, labels).backward()
            for p in session.scope.params:
                p.grad = None
            times.append(time.perf_counter() - t)
    return float(reduce(times))


def sketch_step_seconds(session, examples: list[dict]) -> float:
    times = []
    for ex in examples:
        enc = session.encode(ex)
        t = time.perf_counter()
        session.sketch(enc)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def caching_overhead(session, examples: list[dict], rounds: int = 3) -> dict:
    """Sketching vs plain forward+backward, interleaved in rounds so drift hits both alike."""
    plain, sk = [], []
    for _ in range(rounds):
        plain.append(plain_step_seconds(session, examples))
        sk.append(sketch_step_seconds(session, examples))
    p, s = float(np.median(plain)), float(np.median(sk))
    return {"plain_step_s": p, "sketch_step_s": s, "ratio": s / p, "examples": len(examples), "rounds": rounds}


def fresh_cache_throughput(session, examples: list[dict], work: Path) -> dict:
    """Cache ``examples`` into a new scratch store, timed end to end (sketches, writes, flushes), and
    time a plain forward+backward of the same examples right before it.

    Runs on every suite run, so the record carries a caching throughput even when the full cache was
    reused from an earlier run; the scratch store is deleted afterwards.
    """
    plain_s = plain_step_seconds(session, examples, reduce=np.sum)
    with tempfile.TemporaryDirectory(dir=work, prefix="throughput-") as tmp:
        stats = build_cache(session.spec, examples, Path(tmp) / "store", session=session)
    return {"examples": stats["rows"], "cache_s": stats["cache_s"], "examples_per_s": stats["examples_per_s"],
            "tokens": stats["tokens"], "plain_s": plain_s, "over_plain": stats["cache_s"] / plain_s}


def quality(session, store, data: dict, gens: list[str], ctrl_gens: list[str], ks: list[int],
            metric: str = "cosine") -> dict:
    """Recall/precision@k and AUROC of the poisoned rows for triggered and control queries, per K."""
    labels = np.zeros(store.n, dtype=bool)
    labels[data["poisoned"]] = True
    k_top = int(labels.sum())
    q_trig = torch.stack([query_sketch(session, q, g)[0] for q, g in zip(data["triggered"], gens)])
    q_ctrl = torch.stack([query_sketch(session, q, g)[0] for q, g in zip(data["control"], ctrl_gens)])
    word = data["response"].split()[0]
    q_word = []
    for q, g in zip(data["triggered"], gens):
        try:
            q_word.append(query_sketch(session, q, g, [word])[0])
        except UserError:  # the hotword is not in this generation
            pass
    q_word = torch.stack(q_word or [q_trig[0]])
    out: dict = {"n": store.n, "n_poisoned": k_top, "base_rate": k_top / store.n, "metric": metric, "by_k": [],
                 "hotword": word, "hotword_queries": len(q_word)}
    full = np.asarray(store.matrix(), dtype=np.float32)
    for K in ks:
        rows = torch.from_numpy(full) if K == store.k else nest(torch.from_numpy(full), K)
        entry = {"k": K}
        for name, q in (("triggered", q_trig), ("control", q_ctrl), ("hotword", q_word)):
            qk = q if K == store.k else nest(q, K)
            scores = MX.score_matrix(rows, qk, metric)
            entry[name] = MX.ranking_metrics(scores, labels, k_top)
        out["by_k"].append(entry)
    scan_res = scan(store, q_trig, metric)
    out["top_example"] = int(scan_res.top(1)[0, 0])
    out["top_is_poisoned"] = bool(labels[out["top_example"]])
    out["query_sketches"] = q_trig
    return out


def cost(session, store, caching: dict, overhead: dict, q_sketches: torch.Tensor, rounds: int = 7) -> dict:
    k, n = store.k, store.n
    sketch_bytes = 2 * k
    llama = architecture("random:llama-2-7b")
    # the model's own weights (tied ones once), not the LoRA adapter's
    smol_numel = sum(p.numel() for name, p in session.model.named_parameters() if "lora_" not in name)
    # Scan and copy interleaved round by round, so drift in the machine's bandwidth hits both alike.
    matrix = store.matrix()
    scans, scans_all, copies = [], [], []
    for _ in range(rounds):
        scans.append(scan(store, q_sketches[:1], "cosine").seconds)
        scans_all.append(scan(store, q_sketches, "cosine").seconds)
        t = time.perf_counter()
        np.array(matrix, copy=True)
        copies.append(time.perf_counter() - t)
    scan_s, scan_all_s, copy_s = float(np.median(scans)), float(np.median(scans_all)), float(np.median(copies))
    n_bytes = n * sketch_bytes
    query_s = overhead["sketch_step_s"]
    exact_per_query = n * overhead["plain_step_s"] + overhead["plain_step_s"]
    return {
        "k": k, "n": n, "scope_dim": session.scope.dim, "bytes_per_example": sketch_bytes,
        "compression_scope": session.scope.dim * 4 / sketch_bytes,
        "compression_model_full": smol_numel * 4 / sketch_bytes, "model_numel": smol_numel,
        "llama2_7b_numel": llama.numel, "compression_llama2_7b": llama.numel * 4 / (2 * (1 << 16)),
        "caching_examples_per_s": caching.get("examples_per_s"), "caching_workers": caching.get("workers"),
        "scan_s": scan_s, "scan_all_queries_s": scan_all_s, "scan_queries": int(q_sketches.shape[0]),
        "scan_bytes_per_s": n_bytes / scan_s, "copy_s": copy_s, "copy_bytes_per_s": n_bytes / copy_s,
        "scan_over_copy_bandwidth": (n_bytes / scan_s) / (n_bytes / copy_s), "rounds": rounds,
        "scan_s_range": [min(scans), max(scans)], "copy_s_range": [min(copies), max(copies)],
        "query_s": query_s + scan_s, "exact_recompute_s": exact_per_query,
        "speedup_vs_exact": exact_per_query / (query_s + scan_s),
    }


def run_influence_suite(suite: InfluenceSuite, out_dir: Path, progress=None) -> dict:
    """Every phase of the suite; returns the record (the caller appends it and renders the report)."""
    started, t0 = now(), time.perf_counter()

    work = cache_dir() / "influence" / suite.name
    work.mkdir(parents=True, exist_ok=True)
    phases: dict = {}

    @contextlib.contextmanager
    def phase(name):
        """Each phase measured as a cell's are (``measure.phases``: wall time, peak memory, other load)."""
        _say(progress, f"{name} ...")
        with measure_phase("cpu") as numbers:
            yield
        phases[name] = {k: v for k, v in numbers.items() if v is not None}

    with phase("data"):
        data = prepare_data(suite)
    with phase("finetune"):
        lora, ft = finetune(suite, data, work, progress)
    spec = suite.cache_spec(lora, InfluenceSpec)
    session = Session(spec)
    with phase("attack"):
        atk = attack(session, data)
    with phase("cache"):
        store_dir = work / f"cache-{_key(spec.meta())}"
        caching = build_cache(spec, data["train"], store_dir, workers=suite.workers, session=session,
                              progress=lambda d, t: _say(progress, f"cache {d}/{t}")
                              if d % 100 == 0 or d == t else None)
        store = SketchStore.open(store_dir)
    with phase("overhead"):
        overhead = caching_overhead(session, data["train"][:16])
    with phase("throughput"):
        overhead["fresh_cache"] = fresh_cache_throughput(session, data["train"][:suite.throughput_examples], work)
    with phase("quality"):
        qual = quality(session, store, data, atk["generations"], atk["control_generations"], suite.ks)
        q_sketches = qual.pop("query_sketches")
    with phase("fidelity"):
        fid_n = suite.fidelity["n"]
        fid_q = suite.fidelity["queries"]
        half = max(1, fid_q // 2)
        fid_queries = ([(q, g) for q, g in zip(data["triggered"][:half], atk["generations"][:half])]
                       + [(q, g) for q, g in zip(data["control"][:fid_q - half], atk["control_generations"])])
        fid = fidelity(session, data["train"][:fid_n], fid_queries, suite.fidelity["ks"])
        if suite.fidelity.get("subspace"):
            del session.sketcher  # its plan; the full-scope comparison builds its own
            fid["subspace"] = subspace_vs_sketch(spec, data["train"][:suite.fidelity["subspace"]], fid_queries)
            session.sketcher = Session.sketcher_for(spec, session.scope.dim)
    with phase("cost"):
        costs = cost(session, store, caching, overhead, q_sketches)
    top = data["train"][qual["top_example"]]
    tokens = token_contributions(session, top, q_sketches[0])
    zo = None
    if suite.zo:
        with phase("zo"):
            del session  # one model in memory at a time
            zo = zo_arm(suite, data, work, progress)
    config = {"model": suite.model, "n_train": suite.n_train, "poison_fraction": suite.poison_fraction,
              "queries": suite.queries, "finetune": suite.finetune, "cache": spec.meta(), "ks": suite.ks,
              "workers": suite.workers, "fidelity": suite.fidelity,
              "throughput_examples": suite.throughput_examples, "trigger": data["trigger"],
              "response": data["response"], **({"zo": suite.zo} if suite.zo else {})}
    sections = {
        "finetune": ft,
        "attack": {k: atk[k] for k in ("triggered_success", "control_success", "example")},
        "caching": caching, "overhead": overhead, "quality": qual, "fidelity": fid, "cost": costs,
        "top_example": {"row": qual["top_example"], "poisoned": qual["top_is_poisoned"],
                        "instruction": top["instruction"], "tokens": tokens}}
    return InfluenceRecord(
        cell_id=_key(config), suite=suite.name, suite_file=str(suite.path) if suite.path else None, config=config,
        sections=sections, zo=zo, phases=phases, env=environment(), git=git_state(), started_at=started,
        finished_at=now(), wall_s=time.perf_counter() - t0).to_json()
