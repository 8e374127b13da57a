"""The Ray executor on a local Ray (2 CPUs, 2 declared GPUs, started once for these tests): the same records
as the local executor, clean cell processes, GPUs never shared, lost workers retried or recorded, and a
killed driver resumed. The cells are the tiny random Llama's, so a whole cell takes seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from zobench.driver import run_suite, select_cells  # noqa: E402
from zobench.executors.ray_executor import RayExecutor  # noqa: E402
from zobench.results import load_records  # noqa: E402
from zobench.spec.suite import load_suite  # noqa: E402

SUITE = (Path(__file__).resolve().parent / "data" / "tiny_suite.yaml").read_text()  # conftest's tiny_suite_run

# Long enough (steps) that a test can kill the worker while the cell is still training.
SLOW = SUITE.replace("steps: 3\n", "steps: 40\n").replace("method: [full, random]", "method: [random]")


def _suite(tmp_path: Path, text: str = SUITE):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    return load_suite(p)


def _ok_ids(path: Path) -> list[str]:
    return sorted(r.cell_id for r in load_records(path) if r.ok)


def test_ray_gives_the_local_executors_records_from_clean_processes(ray_local, tiny_suite_run, tmp_path):
    (tmp_path / "b").mkdir()
    local = {r.cell_id: r for r in load_records(tiny_suite_run)}
    ray = {r.cell_id: r for r in load_records(run_suite(_suite(tmp_path / "b"), tmp_path / "b" / "res",
                                                        executor=RayExecutor()))}
    assert set(local) == set(ray) and len(ray) == 3  # forward, full, random: each appended once
    for cid, r in ray.items():
        lo = local[cid]
        assert r.ok and lo.ok
        assert r.execution.executor == "ray" and r.execution.ray_imported is False
        assert r.execution.gpu == "" and r.execution.threads == 2 and r.execution.worker_pid != os.getpid()
        # Same computation: same losses and accuracies (same seeds, same thread count).
        assert r.metrics.get("loss_curve") == pytest.approx(lo.metrics.get("loss_curve"), rel=1e-6)
        assert r.metrics.get("acc_after") == lo.metrics.get("acc_after")
        # Same process footprint: the task's child carries nothing of Ray's.
        for phase in ("load", "train"):
            assert abs(r.phases[phase].peak_rss_mib - lo.phases[phase].peak_rss_mib) < 25, (cid, phase)


@pytest.mark.slow  # ~40 s; CI keeps the Ray executor's records test and its private-instance token test
def test_cells_running_at_once_never_share_a_gpu(ray_local, tmp_path):
    # 6 seeds x (random + its forward reference). On this CPU machine a CUDA cell ends quickly as
    # unsupported, but only after Ray gave it a GPU and its process started: enough to see which GPU each
    # cell got and when it ran.
    text = SUITE.replace("method: [full, random]", "method: [random]\n  seed: [0, 1, 2, 3, 4, 5]") \
        .replace("device: cpu", "device: cuda")
    recs = load_records(run_suite(_suite(tmp_path, text), tmp_path / "res", executor=RayExecutor()))
    cuda = [r for r in recs if r.config["device"] == "cuda"]
    assert len(cuda) == 12 and all(r.status == "unsupported" for r in cuda)
    assert all(r.execution.gpu in ("0", "1") for r in cuda)
    spans = [(r.execution.span_s, r.execution.gpu) for r in cuda]
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]
                   if a[0][0] < b[0][1] and b[0][0] < a[0][1]]
    assert overlapping, "no two cells ran at the same time: the test shows nothing"
    assert all(a[1] != b[1] for a, b in overlapping)


class _KillWorker:
    """A reporter that SIGKILLs the Ray worker running the first cell once that cell reports training."""

    def __init__(self):
        self.workers, self.killed = {}, None

    def __call__(self, kind, data):
        if kind == "start":
            self.workers[data["cell"].cell_id] = data["where"]["worker_pid"]
        elif kind == "progress" and self.killed is None and data.get("step"):
            self.killed = (data["cell"].cell_id, self.workers[data["cell"].cell_id])
            os.kill(self.killed[1], signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_cell_recorded_once(ray_local, tmp_path):
    kill = _KillWorker()
    out = run_suite(_suite(tmp_path, SLOW), tmp_path / "res", executor=RayExecutor(max_retries=1),
                    reporter=kill, cells=[c for c in select_cells(_suite(tmp_path, SLOW))
                                          if c.config.method == "random"])
    assert kill.killed is not None
    recs = load_records(out)
    assert [r.cell_id for r in recs] == [kill.killed[0]]
    assert recs[0].ok and recs[0].execution.worker_pid != kill.killed[1]  # a new worker ran it again


@pytest.mark.slow
def test_with_no_retries_a_lost_cell_is_recorded_and_resume_redoes_only_it(ray_local, tmp_path):
    suite = _suite(tmp_path, SLOW)
    kill = _KillWorker()
    out = run_suite(suite, tmp_path / "res", executor=RayExecutor(max_retries=0), reporter=kill)
    recs = {r.cell_id: r for r in load_records(out)}
    lost = recs[kill.killed[0]]
    assert lost.status == "lost" and "--resume" in lost.reason
    assert sum(r.ok for r in recs.values()) == len(recs) - 1
    run_suite(suite, tmp_path / "res", executor=RayExecutor(), resume=True)
    again = load_records(out)
    assert [r.cell_id for r in again[len(recs):]] == [lost.cell_id]  # only the lost cell ran again
    assert _ok_ids(out) == sorted(c.cell_id for c in select_cells(suite))


@pytest.mark.slow
def test_a_killed_driver_resumes_with_one_ok_record_per_cell(tmp_path):
    """The CLI with its own private Ray: killed after its first record, then --resume."""
    suite = tmp_path / "t.yaml"
    suite.write_text(SUITE)
    cmd = [sys.executable, "-m", "zobench.cli", "run", str(suite), "--executor", "ray", "--out",
           str(tmp_path / "res"), "--reports", str(tmp_path / "rep")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    results = tmp_path / "res" / "t.jsonl"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (results.exists() and results.read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its Ray instance must not outlive it for long
    finally:
        proc.wait()
    first = load_records(results)
    assert 1 <= len(first) < 3
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    recs = load_records(results)
    ids = [r.cell_id for r in recs if r.ok]
    assert sorted(ids) == sorted(set(ids)) and len(set(ids)) == 3  # exactly one ok record per cell
    assert [r.cell_id for r in recs[:len(first)]] == [r.cell_id for r in first]  # nothing rewritten
    assert {r.execution.executor for r in recs} == {"ray"}


@pytest.mark.slow  # CI keeps the Ray executor's records test and its private-instance token test
def test_bad_address_is_one_line_and_exit_2(tmp_path):
    suite = tmp_path / "t.yaml"
    suite.write_text(SUITE)
    done = subprocess.run([sys.executable, "-m", "zobench.cli", "run", str(suite), "--executor", "ray",
                           "--address", "ray://127.0.0.1:9", "--out", str(tmp_path / "res")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2
    assert "--address ray://127.0.0.1:9" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "res" / "t.jsonl").exists()  # no results file before the cluster is joined


# -- influence caching on Ray actors ---------------------------------------------------------------------

INFLUENCE = dict(model="random:tiny-llama", scope="all", k=512, max_length=48)


@pytest.fixture(scope="module")
def alpaca(data_dir):
    from zobench.tasks.instruction import load_alpaca

    return load_alpaca(data_dir / "alpaca" / "alpaca_data_en_52k.json", n=40, seed=3)


def _one_process(spec, rows, out) -> np.ndarray:
    """The reference: the same rows sketched by one process with one thread (as each actor here has)."""
    import torch

    from zobench.influence.cache import build_cache
    from zobench.influence.store import SketchStore

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_cache(spec, rows, out)
    finally:
        torch.set_num_threads(threads)
    return np.asarray(SketchStore.open(out).matrix())


def _actor_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::SketchWorker")]


@pytest.mark.slow
def test_two_actors_build_the_one_process_cache_bit_for_bit_even_when_one_dies(ray_local, alpaca, tmp_path):
    from zobench.influence.cache import build_cache
    from zobench.influence.session import InfluenceSpec
    from zobench.influence.store import SketchStore

    spec = InfluenceSpec.from_dict(INFLUENCE, "test")
    killed = []

    def kill_one_actor(done, total):  # after the first chunk lands, while the others are in flight
        if not killed and done < total:
            killed.append(_actor_pids()[0])
            os.kill(killed[0], signal.SIGKILL)

    stats = build_cache(spec, alpaca, tmp_path / "c", workers=2, device="cpu", executor="ray",
                        progress=kill_one_actor)
    assert killed and stats["lost_chunks"] >= 1  # a chunk in flight on the dead actor was done again
    assert stats["rows"] == len(alpaca) and stats["workers"] == 2 and len(stats["per_worker"]) == 2
    assert sum(w["rows"] for w in stats["per_worker"]) == len(alpaca)
    store = SketchStore.open(tmp_path / "c")
    assert store.complete
    assert np.array_equal(np.asarray(store.matrix()), _one_process(spec, alpaca, tmp_path / "one"))


@pytest.mark.slow
def test_a_killed_ray_cache_driver_resumes_to_the_same_cache(alpaca, tmp_path):
    """The CLI with its own private Ray, SIGKILLed once rows have landed, then run again."""
    import json

    from zobench.influence.store import SketchStore

    data = tmp_path / "rows.json"
    data.write_text(json.dumps(alpaca))
    cmd = [sys.executable, "-m", "zobench.cli", "influence", "cache", "--model", INFLUENCE["model"],
           "--scope", "all", "--k", "512", "--max-length", "48", "--data", str(data), "--executor", "ray",
           "--workers", "2", "--out", str(tmp_path / "c")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            if (tmp_path / "c" / "meta.json").exists():
                missing = len(SketchStore.open(tmp_path / "c").missing())
                if missing < len(alpaca):
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert 0 < len(SketchStore.open(tmp_path / "c").missing()) < len(alpaca), "killed too late to show a resume"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already cached" in done.stdout and "worker 1:" in done.stderr
    store = SketchStore.open(tmp_path / "c")
    # The reference: one process over the rows as the command read them (ids added, in file order).
    from zobench.influence.cache import load_cache_dir

    spec, rows = load_cache_dir(tmp_path / "c")
    assert store.complete and np.array_equal(np.asarray(store.matrix()), _one_process(spec, rows, tmp_path / "one"))


def test_the_private_ray_refuses_a_client_without_its_run_token(ray_local):
    """Ray's ports listen on every interface: the private instance keeps token auth on, with a token made
    for the run and kept in this process tree's environment (no file under the user's home)."""
    addr = ray_local.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = os.environ.get("HOME", "/")
    env["RAY_gcs_server_port_wait_time_s"] = "2"  # two tries at joining, not twenty (a refusal is not retried away)
    code = ("import ray\ntry:\n    ray.init(address=%r, log_to_driver=False)\n    print('JOINED')\n"
            "except Exception as e:\n    print('REFUSED', type(e).__name__)" % addr)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1].startswith("REFUSED"), out.stdout + out.stderr[-500:]
    assert len(os.environ.get("RAY_AUTH_TOKEN", "")) == 64
