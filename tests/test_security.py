"""One test per promise of docs/security.md: artifacts are data, never code, and nothing the user owns is
lost. Commands run in-process through ``zobench.cli.main`` (no interpreter start per case)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zobench.cell import delta as D
from zobench.cell import delta_tensors as DT
from zobench.cell.pipeline import Pipeline
from zobench.cli import main
from zobench.errors import UserError
from zobench.spec.config import CellConfig

TINY = dict(model="random:tiny-llama", task="sst2", n_train=16, n_dev=0, n_test=0, batch_size=4, max_length=32,
            steps=2, warmup_steps=0, eval_before=False, eval_after=False, device="cpu", density=0.05,
            method="random", lr=1e-2)


def run(capsys, *argv) -> tuple[int, str]:
    """``zobench ARGV`` in this process: (exit code, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exits
        code = e.code
    return code, capsys.readouterr().err


def refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and 1 <= len(err.strip().splitlines()) <= 3, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def kept(tmp_path_factory) -> Path:
    """A real sparse delta of the tiny model (2 steps), made once; tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("kept") / "delta"
    Pipeline(CellConfig.from_dict(dict(TINY, save=str(out)))).run()
    return out


def copy(kept: Path, where: Path) -> Path:
    shutil.copytree(kept, where)
    return where


def edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "delta.json").read_text())
    meta.update(changes)
    (path / "delta.json").write_text(json.dumps(meta))


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- nothing the user owns is deleted or overwritten ------------------------------------------------------

def test_save_into_a_directory_that_is_not_a_delta_is_refused_and_left_whole(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "data.bin").write_bytes(b"\0" * 10)
    before = snapshot(mine)
    code, err = run(capsys, "train", "--model", "random:tiny-llama", "--steps", "1", "--save", mine,
                    "--out", tmp_path / "o")
    refused(code, err, str(mine), "not a zobench delta")
    assert snapshot(mine) == before


@pytest.mark.parametrize("target", [".", "..", "HOME", "/"])
def test_save_onto_the_working_directory_its_parents_home_or_root_is_refused_outright(tmp_path, capsys,
                                                                                       monkeypatch, target):
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("x")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    save = str(tmp_path / "home") if target == "HOME" else target
    code, err = run(capsys, "train", "--model", "random:tiny-llama", "--steps", "1", "--save", save,
                    "--overwrite", "--out", tmp_path / "o")
    refused(code, err, "must be a directory of its own")
    assert (work / "precious.txt").read_text() == "x"


def test_replacing_a_delta_needs_the_flag_and_swaps_it_whole(kept, tmp_path):
    target = copy(kept, tmp_path / "d")
    old = snapshot(target)
    with pytest.raises(UserError, match="--overwrite"):
        D.claim_target(target)
    assert D.claim_target(target, overwrite=True) == target
    stage = tmp_path / ".stage"
    shutil.copytree(kept, stage)
    (stage / "extra").write_text("new")
    from zobench.outdirs import replace_dir

    replace_dir(stage, target)
    assert (target / "extra").read_text() == "new" and not stage.exists()
    assert {k: v for k, v in snapshot(target).items() if k != "extra"} == old
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no leftover of the old one


def test_a_results_file_that_is_a_link_is_never_written_through(tmp_path):
    from zobench.files import append_line
    from zobench.outdirs import check_output_file

    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("someone else's\n")
    link = tmp_path / "r.jsonl"
    link.symlink_to(elsewhere)
    with pytest.raises(UserError, match="symbolic link"):
        check_output_file(link, "results file")
    with pytest.raises(UserError, match="symbolic link"):
        append_line(link, b"{}\n")
    assert elsewhere.read_text() == "someone else's\n"


def test_one_writer_per_results_file(tmp_path):
    from zobench.outdirs import output_lock

    with output_lock(tmp_path / "a.jsonl"):
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            with output_lock(tmp_path / "a.jsonl"):
                pass
        with output_lock(tmp_path / "b.jsonl"):  # another suite's file beside it: no conflict
            pass
    with output_lock(tmp_path / "a.jsonl"):  # released with its holder
        pass


# -- artifacts cannot choose code ----------------------------------------------------------------------

def remote_code_model(root: Path, marker: Path) -> Path:
    """A model folder whose config asks transformers to import its own Python file, which would write
    ``marker``."""
    model = root / "evil-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return model


def test_a_delta_naming_a_model_with_remote_code_never_runs_it(kept, tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    model = remote_code_model(tmp_path, marker)
    evil = copy(kept, tmp_path / "evil-delta")
    meta = json.loads((evil / "delta.json").read_text())
    meta["config"].update(model=str(model), trust_remote_code=True)
    meta["base"]["model"] = str(model)
    (evil / "delta.json").write_text(json.dumps(meta))
    code, err = run(capsys, "eval", "--delta", evil, "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in err, err
    assert not marker.exists()


def test_a_suite_cannot_turn_on_remote_code_or_choose_where_progress_goes(tmp_path, capsys):
    for key, value in (("trust_remote_code", "true"), ("checkpoint", "/tmp/x.json"), ("overwrite", "true")):
        suite = tmp_path / f"{key}.yaml"
        suite.write_text(f"name: s\ndefaults: {{model: 'random:tiny-llama', {key}: {value}}}\n"
                         f"matrix: {{method: [forward]}}\n")
        code, err = run(capsys, "run", suite, "--dry-run")
        refused(code, err, f"key '{key}' cannot be set in a file")


def _git_repo(repo: Path, tmp_path: Path, files: dict) -> dict:
    """A repository at ``repo`` holding ``files`` in one commit; returns the env git ran with."""
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", HOME=str(tmp_path), GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run(["git", *args], cwd=repo, check=True, env=env)
    return env


def test_provenance_never_runs_what_a_checkout_configures(tmp_path):
    """A checkout's config may run commands (fsmonitor, hooks, clean filters, which git status runs on any
    file whose timestamps changed): reading a checkout's state runs none of them, even when its files were
    touched and changed. Records name zobench's own checkout, never a suite's folder."""
    from zobench.measure.machine import SOURCE, git_state

    marker = tmp_path / "PAYLOAD_RAN"
    repo = tmp_path / "theirs"
    repo.mkdir()
    env = _git_repo(repo, tmp_path, {"f": "1", "g": "2", ".gitattributes": "* filter=x\n"})
    for key, value in (("core.fsmonitor", f"touch {marker}"), ("filter.x.clean", f"touch {marker}; cat"),
                       ("filter.x.process", f"touch {marker}")):
        subprocess.run(["git", "config", key, value], cwd=repo, check=True, env=env)
    os.utime(repo / "f", (1, 1))  # stat data that no longer match the index: git status would filter it
    (repo / "g").write_text("3")
    state = git_state(repo)
    assert not marker.exists()
    assert state["dirty"] is True  # and the change to g is still seen
    assert git_state() == git_state(SOURCE)  # what records carry: zobench's own checkout


def test_dirty_means_the_code_changed_not_the_results(tmp_path):
    from zobench.measure.machine import git_state

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "zobench").mkdir()
    os.symlink("a.py", repo / "zobench" / "link.py")
    env = _git_repo(repo, tmp_path, {"zobench/a.py": "x = 1\n", "zobench/b.py": "y = 1\n",
                                     "results/r.jsonl": "{}\n"})
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, env=env, capture_output=True, text=True)
    assert git_state(repo) == {"commit": head.stdout.strip(), "dirty": False}
    (repo / "results" / "r.jsonl").write_text("{}\n{}\n")
    (repo / "notes.txt").write_text("untracked")
    assert git_state(repo)["dirty"] is False  # results and untracked files are not the code

    def dirty_after(change, undo) -> bool:
        change()
        try:
            return git_state(repo)["dirty"]
        finally:
            undo()
            assert git_state(repo)["dirty"] is False

    a, b, link, new = (repo / "zobench" / n for n in ("a.py", "b.py", "link.py", "c.py"))

    def relink(target):
        link.unlink()
        os.symlink(target, link)

    def git(*args):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)

    assert dirty_after(lambda: a.write_text("x = 2\n"), lambda: a.write_text("x = 1\n"))
    assert dirty_after(lambda: a.chmod(0o755), lambda: a.chmod(0o644))
    assert dirty_after(b.unlink, lambda: b.write_text("y = 1\n"))
    assert dirty_after(lambda: relink("b.py"), lambda: relink("a.py"))
    assert dirty_after(lambda: (new.write_text("z"), git("add", str(new))),  # added, not committed
                       lambda: (git("rm", "-q", "--cached", str(new)), new.unlink()))


def test_a_random_config_file_cannot_name_code():
    from zobench.models.load import random_config

    with pytest.raises(UserError, match="auto_map"):
        random_config(str(Path(__file__).with_name("data") / "evil_config.json"), False)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, "not a config transformers can build"),
    ({"hidden_size": "x"}, "key 'hidden_size' = x: expected a whole number >= 1"),
    ({"num_attention_heads": -1}, "key 'num_attention_heads' = -1"),
    ({"num_hidden_layers": 0}, "key 'num_hidden_layers' = 0"),
    ({"vocab_size": True}, "key 'vocab_size' = True"),
    ({"intermediate_size": {}}, "key 'intermediate_size' = {}")])
def test_a_random_config_with_sizes_no_model_has_is_one_line(tmp_path, change, message):
    """A random: model's config is data: a size that is not a whole number >= 1 (or that transformers' own
    config validation refuses) is refused naming the file and the key, not a torch or transformers traceback
    (a negative head count failed in the allocator; -1 layers built a model with none)."""
    from zobench.models.load import random_config
    from zobench.spec.models import random_config_path

    config = json.loads(random_config_path("tiny-llama").read_text())
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=re.escape(message)) as e:
        random_config(str(path), False)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    path.write_text(json.dumps(config))
    assert random_config(str(path), False).hidden_size == config["hidden_size"]


# -- every artifact is validated before use --------------------------------------------------------------

def chained(kept: Path, root: Path, n: int) -> list[Path]:
    """n copies of the delta, each the parent of the next (relative paths, as zobench writes them)."""
    links = []
    for i in range(n):
        d = copy(kept, root / f"link{i}")
        if links:
            edit_meta(d, parent=os.path.relpath(links[-1], d))
        links.append(d)
    return links


def test_a_chain_is_followed_to_its_root_and_refused_when_broken(kept, tmp_path):
    links = chained(kept, tmp_path, 3)
    assert [p for p, _ in D.chain(links[2])] == [Path(str(p)) for p in links]
    shutil.rmtree(links[0])  # the grandparent is gone
    with pytest.raises(UserError, match="is gone"):
        D.chain(links[2])
    edit_meta(links[1], parent=".")  # its own parent
    with pytest.raises(UserError, match="cycle"):
        D.chain(links[1])
    edit_meta(links[1], parent=os.path.relpath(links[2], links[1]))  # a cycle of two
    with pytest.raises(UserError, match="cycle"):
        D.chain(links[2])


def test_a_chain_works_from_any_working_directory(kept, tmp_path, monkeypatch):
    links = chained(kept, tmp_path / "deltas", 2)
    elsewhere = tmp_path / "far" / "away"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert len(D.chain(os.path.relpath(links[1]))) == 2


def test_a_parent_is_never_found_through_the_working_directory(kept, tmp_path, monkeypatch):
    """A delta's relative parent is its own folder's: a delta of that name in the working directory (with
    the same base weights) is not taken in its place."""
    links = chained(kept, tmp_path / "deltas", 2)
    edit_meta(links[1], parent="stand-in")
    copy(kept, tmp_path / "cwd" / "stand-in")
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(UserError, match="is gone"):
        D.chain(links[1])


@pytest.mark.parametrize("changes, needle", [
    ({"step": -1}, "'step'"), ({"step": 10**18}, "'step'"), ({"step": 1.5}, "'step'"),
    ({"format": 99}, "format"), ({"format": True}, "format"), ({"kind": "pickle"}, "format"),
    ({"base": "x"}, "'base'"), ({"config": {"method": "random", "seed": 2**64}}, "'seed'"),
    ({"config": {"method": "random", "device": "x"}}, "'device'"),
    ({"config": {"method": "random", "evil": 1}}, "unknown key 'evil'"),
    ({"config": {"method": "nope"}}, "method"), ({"config": []}, "settings"),
    ({"parent": 5}, "'parent'"),
])
def test_a_malformed_delta_json_is_one_line(kept, tmp_path, changes, needle):
    d = copy(kept, tmp_path / "d")
    edit_meta(d, **changes)
    with pytest.raises(UserError, match=needle):
        D.read(d)


def test_trajectories_with_bad_seeds_or_coefficients_are_refused(kept, tmp_path):
    d = copy(kept, tmp_path / "d")
    for trajectory in ([[[1, float("nan")]]] * 2, [[[1, 0.5]]], [[[-1, 0.5]]] * 2, [[["1", 0.5]]] * 2, [[]] * 2):
        text = json.dumps({**json.loads((kept / "delta.json").read_text()), "kind": "trajectory",
                           "trajectory": trajectory})
        (d / "delta.json").write_text(text)
        with pytest.raises(UserError):
            D.read(d)


def tensors_case(kept: Path, where: Path, change) -> Path:
    d = copy(kept, where)
    data = load_file(str(d / D.TENSORS))
    change(data)
    save_file(data, str(d / D.TENSORS))
    return d


def first(data, part):
    return next(k for k in data if k.endswith(part))


@pytest.mark.parametrize("case, needle", [
    ("nan", "not finite"), ("negative", "negative"), ("duplicate", "twice"), ("float_index", "int32 or int64"),
    ("unpaired", "no values"), ("out_of_range", "outside"), ("unknown", "does not have"),
])
def test_damaged_sparse_tensors_are_refused_before_they_touch_a_weight(kept, tmp_path, case, needle):
    def change(data):
        i, v = first(data, "::index"), first(data, "::value")
        if case == "nan":
            data[v][0] = float("nan")
        elif case == "negative":
            data[i][0] = -3
        elif case == "duplicate":
            data[i][1] = data[i][0]
        elif case == "float_index":
            data[i] = data[i].float()
        elif case == "unpaired":
            del data[v]
        elif case == "out_of_range":
            data[i][0] = 2**30
        else:
            data["nope.weight::index"], data["nope.weight::value"] = data.pop(i), data.pop(v)
    d = tensors_case(kept, tmp_path / "d", change)
    model = Pipeline(CellConfig.from_dict(dict(TINY, steps=0)))
    model.sample_data()
    model.load()
    with pytest.raises(UserError, match=needle):
        mask, values = DT.sparse_parts(d)
        DT.write_sparse(model.run_state.model, mask, values)


def test_a_corrupt_safetensors_header_is_one_line_from_the_command_line(kept, tmp_path, capsys):
    d = copy(kept, tmp_path / "d")
    (d / D.TENSORS).write_bytes(b"\xff" * 8 + b"{not json" + b"\0" * 64)
    code, err = run(capsys, "eval", "--delta", d, "--out", tmp_path / "o")
    refused(code, err, "safetensors")


def test_adapters_are_safetensors_and_name_no_code(tmp_path):
    from zobench.cell.delta_check import check_adapter
    from zobench.cell.delta_tensors import check_adapter_weights

    a = tmp_path / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        check_adapter(a)
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (a / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="never as a pickle"):
        check_adapter(a)
    (a / "adapter_model.safetensors").write_bytes(b"")
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "megatron_config": {},
                                                        "megatron_core": "os"}))
    with pytest.raises(UserError, match="import a module"):
        check_adapter(a)
    # the ranks peft allocates by before it checks anything (r = 2,000,000 took 4 GB), and the weights
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    weights_file = str(a / "adapter_model.safetensors")
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(8, 4)}, weights_file)
    check_adapter(a)
    for config, needle in (({"r": 2_000_000}, "r = 2000000: expected a number in (0, 65536]"),
                           ({"r": 8, "rank_pattern": {"q_proj": 10**9}}, "r = 1000000000"),
                           ({"r": 8, "lora_alpha": -1}, "lora_alpha = -1"),
                           ({"r": 8, "rank_pattern": [1]}, "rank_pattern")):
        (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
        with pytest.raises(UserError, match=re.escape(needle)):
            check_adapter(a)
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    check_adapter_weights(a)
    for weights, needle in (({}, "holds no tensors"), ({"w": torch.tensor([float("nan")])}, "not finite"),
                            ({"w": torch.zeros(2, dtype=torch.int32)}, "expected floating-point values")):
        save_file(weights, weights_file)
        with pytest.raises(UserError, match=needle):
            check_adapter_weights(a)


# -- bounded cost on any input -------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n", "aliases"),
    ("name: s\nmatrix: " + "[" * 200 + "]" * 200 + "\n", "nested deeper"),
    ("[" * 100_000, "nested deeper"),
])
def test_yaml_bombs_and_deep_nesting_are_refused_at_once(tmp_path, capsys, text, needle):
    suite = tmp_path / "s.yaml"
    suite.write_text(text)
    code, err = run(capsys, "run", suite, "--dry-run")
    refused(code, err, str(suite), needle)


def test_deep_or_huge_json_is_refused(tmp_path):
    from zobench.files import parse_json, read_text

    with pytest.raises(UserError, match="nested deeper"):
        parse_json("[" * 100_000 + "]" * 100_000, "x.json")
    with pytest.raises(UserError, match="nested deeper"):
        parse_json("[" * 40 + "]" * 40, "x.json")
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(2 << 20)
    with pytest.raises(UserError, match="more than zobench reads"):
        read_text(big, "suite file", 1 << 20)


def test_an_over_long_data_line_is_refused_before_any_tokenizer_sees_it(tmp_path):
    from zobench.tasks import get_task

    sst2 = tmp_path / "SST-2"
    sst2.mkdir()
    (sst2 / "train.tsv").write_text("sentence\tlabel\nfine\t1\n" + "a" * 2_000_000 + "\t0\n")
    (sst2 / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(UserError, match=r"train.tsv:3: a line longer"):
        get_task("sst2").read("train", tmp_path)


def test_deriving_is_linear_in_the_number_of_records(monkeypatch):
    """Each record's references are found once per group, not by scanning the group again per record (which
    made 100,000 records never finish)."""
    from zobench import results as derive_module
    from zobench.cell.record import CellRecord

    calls = []
    family = derive_module._family
    monkeypatch.setattr(derive_module, "_family", lambda r: calls.append(1) or family(r))
    for n in (200, 2000):
        calls.clear()
        recs = [CellRecord(cell_id=f"{i:06d}", status="ok", config={"method": "random", "model": "m"})
                for i in range(n)]
        derive_module.derive(recs)
        assert len(calls) <= 3 * n


def test_an_unserved_cluster_address_is_refused_quickly():
    import socket

    from zobench.gates.ray import reachable

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    with pytest.raises(UserError, match="nothing answers"):
        reachable(f"127.0.0.1:{port}")


def test_a_process_started_by_zobench_dies_with_its_parent_even_by_sigkill(tmp_path):
    """The parent (a stand-in for `zobench run` or `influence cache`) starts a child that calls
    ``die_with_parent`` and then would write a file every 0.1 s; the parent is killed with SIGKILL."""
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "parent.py"
    beat = tmp_path / "beat"
    script.write_text(f"""
import multiprocessing as mp, os, time
from zobench.procs import die_with_parent
def child(parent):
    die_with_parent(parent)
    while True:
        open({str(beat)!r}, 'a').write('.')
        time.sleep(0.1)
if __name__ == '__main__':
    p = mp.get_context('spawn').Process(target=child, args=(os.getpid(),))
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)
""")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    child = int(parent.stdout.readline())
    deadline = time.time() + 60
    while not beat.exists() and time.time() < deadline:
        time.sleep(0.1)
    parent.kill()
    parent.wait()
    gone = psutil.wait_procs([psutil.Process(child)], timeout=10)[0] if psutil.pid_exists(child) else True
    assert gone, "the child outlived its parent"
    size = beat.stat().st_size
    time.sleep(0.5)
    assert beat.stat().st_size == size


# -- exit codes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["influence", "query", "--cache", "c", "--instruction", "i", "--generation", "g", "--top", "-3"], "--top"),
    (["influence", "cache", "--data", "d", "--out", "o", "--n-train", "-1"], "--n-train"),
    (["influence", "cache", "--data", "d", "--out", "o", "--k", "0"], "--k"),
    (["influence", "train", "--data", "d", "--save", "s", "--lr", "nan"], "--lr"),
    (["run", "s.yaml", "--no-such-flag"], "unrecognized"),
    (["train"], "--out"),
])
def test_nonsense_numbers_and_usage_errors_are_one_line_and_exit_2(capsys, argv, needle):
    code, err = run(capsys, *argv)
    refused(code, err, needle, "--help")
    assert len(err.strip().splitlines()) == 1


def test_ids_7_and_text_7_are_one_id(tmp_path):
    from zobench.tasks.instruction import load_alpaca

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"id": 7, "instruction": "a", "output": "b"},
                                {"id": "7", "instruction": "c", "output": "d"}]))
    with pytest.raises(UserError, match="share the id"):
        load_alpaca(rows)


def test_tensors_deltas_must_match_the_model(tmp_path):
    from zobench.cell.delta_tensors import checked_tensors

    f = tmp_path / D.TENSORS
    save_file({"w": torch.zeros(2, 3)}, str(f))
    assert set(checked_tensors(f, {"w": (2, 3)})) == {"w"}
    with pytest.raises(UserError, match="shape"):
        checked_tensors(f, {"w": (3, 2)})
    save_file({"w": torch.full((2, 3), float("inf"))}, str(f))
    with pytest.raises(UserError, match="not finite"):
        checked_tensors(f, {"w": (2, 3)})


def test_a_pipe_or_device_where_a_file_belongs_is_refused_not_read_forever(tmp_path):
    from zobench.files import read_text
    from zobench.results import load_records

    fifo = tmp_path / "r.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        load_records(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        read_text("/dev/zero", "instruction data file")


def test_a_huge_matrix_an_empty_only_value_or_a_bad_name_is_refused(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ndefaults: {model: 'random:tiny-llama'}\n"
                     f"matrix: {{seed: {list(range(1000))}, lr: {[1e-3 * i for i in range(1, 101)]}}}\n")
    refused(*run(capsys, "run", suite, "--dry-run"), "100,000 combinations")
    suite.write_text("name: s\ndefaults: {model: 'random:tiny-llama'}\nmatrix: {method: [forward]}\n")
    refused(*run(capsys, "run", suite, "--dry-run", "--only", "method="), "value is empty")
    refused(*run(capsys, "run", suite, "--dry-run", "--only", "method=sensitive"), "selects none")
    # a selector's value is YAML typed on the command line: the strict loader reads it, and its errors are a line
    refused(*run(capsys, "run", suite, "--dry-run", "--only", "method=[x"), "--only method=[x: not valid YAML")
    refused(*run(capsys, "run", suite, "--dry-run", "--only", "method=!!python/name:os.system"), "not valid YAML")
    refused(*run(capsys, "run", suite, "--dry-run", "--only", "method=&a forward"), "anchors and aliases")
    suite.write_text('name: "a\\0b"\nmatrix: {method: [forward]}\n')
    refused(*run(capsys, "run", suite, "--dry-run"), "key 'name'")


def test_a_report_never_removes_plots_through_a_link(tmp_path, capsys):
    from zobench.report import plots_folder

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "dev_accuracy.png").write_bytes(b"mine")
    (tmp_path / "r_plots").symlink_to(theirs)
    with pytest.raises(UserError, match="symbolic link"):
        plots_folder(tmp_path / "r.md")
    assert (theirs / "dev_accuracy.png").read_bytes() == b"mine"


def test_a_mistyped_flag_is_named_even_when_a_required_one_is_missing(capsys):
    code, err = run(capsys, "influence", "query", "--cache", "c", "--instrucion", "x", "--generation", "g")
    refused(code, err, "unknown flag --instrucion", "did you mean --instruction?")


def test_a_key_with_a_newline_still_gives_one_line():
    """A name read from a file may hold control characters; the refusal stays one line (found by the fuzz
    test: a delta config key '\\n')."""
    from zobench.cell.delta_check import check_config
    from zobench.errors import UserError

    with pytest.raises(UserError) as e:
        check_config({"\n": 1}, "d/delta.json: config")
    assert "\n" not in str(e.value) and "unknown key '\\n'" in str(e.value)


def test_a_claims_suite_refuses_a_tree_whose_code_changed(capsys, tmp_path, monkeypatch):
    """Records of a claims suite must say which code made them: on a changed tree the run stops before
    anything is written, unless --allow-dirty says so."""
    import zobench.cli.run as cli_run

    monkeypatch.setattr(cli_run, "git_state", lambda: {"commit": "0123456789abcdef", "dirty": True})
    suite = Path(__file__).resolve().parents[1] / "suites" / "claims-v2.yaml"
    out, reports = tmp_path / "results", tmp_path / "reports"
    code, err = run(capsys, "run", suite, "--out", out, "--reports", reports)
    refused(code, err, "declares claims", "0123456789ab", "--allow-dirty")
    assert not [p for d in (out, reports) if d.exists() for p in d.rglob("*") if p.is_file()]
    monkeypatch.setattr(cli_run, "git_state", lambda: {"commit": "0123456789abcdef", "dirty": False})
    monkeypatch.setattr(cli_run, "output_lock", lambda path: (_ for _ in ()).throw(UserError("past the check")))
    code, err = run(capsys, "run", suite, "--out", out, "--reports", reports)
    refused(code, err, "past the check")  # a clean tree gets past it (and stops at the next step here)
