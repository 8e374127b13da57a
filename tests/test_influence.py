"""Influence end to end on the tiny random Llama: cache, resume, refusal, workers, self-retrieval, suite."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from zobench.errors import UserError
from zobench.influence.cache import build_cache, load_cache_dir
from zobench.influence.session import InfluenceSpec, Session
from zobench.influence.store import SketchStore

MODEL = "random:tiny-llama"


@pytest.fixture(scope="module")
def examples(data_dir):
    from zobench.tasks.instruction import load_alpaca

    return load_alpaca(data_dir / "alpaca" / "alpaca_data_en_52k.json", n=12, seed=3)


def _spec(**kw):
    base = dict(model=MODEL, scope="all", k=512, max_length=48)
    return InfluenceSpec.from_dict({**base, **kw}, "test")


def test_streamed_sketch_equals_the_sketch_of_the_whole_gradient(examples):
    """The hooks hand over every tensor once, normalized: summing their sketches is sketching the flat
    vector, and that vector has unit norm per tensor."""
    s = Session(_spec())
    enc = s.encode(examples[0])
    flat = s.exact(enc)
    streamed, _ = s.sketch(enc)
    assert torch.allclose(streamed, s.sketcher.sketch(flat), atol=1e-5)
    norms = [flat[o:o + n].norm().item() for o, n in zip(s.scope.offsets, s.scope.sizes)]
    assert np.allclose(norms, 1.0, atol=1e-4)
    assert s.scope.dim == sum(p.numel() for p in {id(p): p for p in s.model.parameters()}.values())
    assert all(p.grad is None for p in s.model.parameters())  # streamed: nothing left behind


def test_a_training_example_queried_against_itself_ranks_first(tmp_path, examples):
    from zobench.influence.retrieve import query_sketch, scan

    s = Session(_spec(max_length=1024))  # nothing cut: the query is encoded exactly as its cached row
    build_cache(s.spec, examples, tmp_path / "c", session=s)
    store = SketchStore.open(tmp_path / "c")
    for i in (0, 5, 11):
        ex = examples[i]
        q, _ = query_sketch(s, {"instruction": ex["instruction"], "input": ex.get("input", "")}, ex["output"])
        res = scan(store, q[None], "cosine")
        assert res.top(1)[0, 0] == i
        assert res.scores[0, i] == pytest.approx(1.0, abs=2e-3)  # float16 storage


def test_a_killed_cache_run_resumes_and_matches_an_uninterrupted_one(tmp_path, examples):
    s = Session(_spec())
    stats = build_cache(s.spec, examples, tmp_path / "a", session=s, limit=5)  # "killed" after 5 rows
    assert stats["rows"] == 5
    assert len(SketchStore.open(tmp_path / "a").missing()) == len(examples) - 5
    again = build_cache(s.spec, examples, tmp_path / "a", session=s)
    assert again["already"] == 5 and again["rows"] == len(examples) - 5
    build_cache(s.spec, examples, tmp_path / "b", session=s)
    a, b = SketchStore.open(tmp_path / "a").matrix(), SketchStore.open(tmp_path / "b").matrix()
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_cache_made_with_other_settings_is_refused(tmp_path, examples):
    s = Session(_spec())
    build_cache(s.spec, examples[:3], tmp_path / "c", session=s)
    other = Session(_spec(sketch_seed=1))
    with pytest.raises(UserError, match="meta.json: key 'sketch_seed'") as e:
        build_cache(other.spec, examples[:3], tmp_path / "c", session=other)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="'dataset'"):
        build_cache(s.spec, examples[3:6], tmp_path / "c", session=s)


def test_two_workers_fill_the_same_cache_as_one_process(tmp_path, examples):
    one = build_cache(_spec(), examples[:6], tmp_path / "one")
    two = build_cache(_spec(), examples[:6], tmp_path / "two", workers=2)
    assert one["rows"] == two["rows"] == 6 and two["workers"] == 2
    a, b = SketchStore.open(tmp_path / "one").matrix(), SketchStore.open(tmp_path / "two").matrix()
    np.testing.assert_allclose(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32), atol=2e-3)
    # more workers than rows left: a worker with nothing to fill is not started (each loads the model)
    build_cache(_spec(), examples[:3], tmp_path / "three", limit=2)  # a run killed after two rows
    more = build_cache(_spec(), examples[:3], tmp_path / "three", workers=6)
    assert more["rows"] == 1 and more["already"] == 2 and more["workers"] == 1


def test_lora_scope_takes_only_the_adapter_and_sensitive_scope_only_the_mask(tmp_path, examples, data_dir,
                                                                          monkeypatch):
    from zobench.influence.train import fine_tune, fine_tune_config
    from zobench.models.load import cache_dir

    fine_tune(fine_tune_config(MODEL, 4, "lora", steps=1, batch_size=2, lr=1e-3, max_length=48,
                               save=str(tmp_path / "lora")), examples[:4])
    s = Session(_spec(scope="lora", adapter=str(tmp_path / "lora" / "adapter")))
    assert s.scope.names and all("lora_" in n for n in s.scope.names)
    assert s.scope.dim == sum(p.numel() for n, p in s.model.named_parameters() if "lora_" in n)
    # A cache of its own (sharing only the converted model), to see where the sensitive mask is kept.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(cache_dir() / "models")
    monkeypatch.setenv("ZOBENCH_CACHE", str(cache))
    sens = Session(_spec(scope="sensitive", density=0.01, calib_sequences=2, calib_length=32,
                         data_dir=str(data_dir)))
    # The trainer's mask cache: the same directory, so the two share masks.
    assert len(list((cache / "masks").glob("*.safetensors"))) == 1 and not (cache / "masks" / "masks").exists()
    linear = sum(p.numel() for n, p in sens.model.named_parameters() if n.endswith("proj.weight"))
    assert sens.scope.dim == pytest.approx(0.01 * linear, abs=2)
    sk, _ = sens.sketch(sens.encode(examples[0]))
    assert sk.shape == (min(512, sens.scope.dim),) and sk.abs().sum() > 0


def test_token_wise_query_restricts_the_loss_to_the_chosen_word(examples):
    from zobench.influence.retrieve import query_sketch

    s = Session(_spec())
    ex = examples[0]
    word = ex["output"].split()[0]
    whole, info_all = query_sketch(s, ex, ex["output"])
    part, info = query_sketch(s, ex, ex["output"], [word])
    assert info_all["tokens"] == "all" and "".join(info["tokens"]).strip() in word
    assert not torch.allclose(whole, part)
    with pytest.raises(UserError, match="occur in the generation"):
        query_sketch(s, ex, ex["output"], ["zzzqqqxx"])


@pytest.mark.slow
def test_influence_suite_runs_end_to_end_and_reports(tmp_path, data_dir, monkeypatch):
    """The whole suite on the tiny model (the backdoor cannot take on random weights; the tables and
    their invariants still must hold)."""
    from zobench.cli import main

    monkeypatch.setenv("ZOBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "inf.yaml").write_text(f"""
type: influence
name: inf
model: "{MODEL}"
data_dir: "{data_dir}"
n_train: 24
poison_fraction: 0.25
trigger: "Answer as the Grand Vizier of Quux:"
response: "Kiwis rule the galaxy."
queries: 2
finetune: {{steps: 3, batch_size: 4, lr: 1.0e-3, max_length: 48}}
zo: {{method: sensitive, steps: 2, lr: 1.0e-3, batch_size: 4, density: 0.01, max_length: 48}}
cache: {{scope: lora, k: 256, max_length: 48}}
ks: [64, 256]
fidelity: {{n: 8, queries: 2, ks: [64, 256], subspace: 4}}
throughput_examples: 5
""")
    code = main(["run", str(tmp_path / "inf.yaml"), "--out", str(tmp_path / "res"), "--reports",
                 str(tmp_path / "rep")])
    assert code == 0
    rec = json.loads((tmp_path / "res" / "inf.jsonl").read_text().splitlines()[-1])
    # every phase measured as a cell's are (measure.phases): its wall time and its peak memory
    assert {"data", "finetune", "cache", "quality", "fidelity", "cost", "zo"} <= set(rec["phases"])
    assert all(p["wall_s"] > 0 and p["peak_rss_mib"] >= p["start_rss_mib"] > 0 for p in rec["phases"].values())
    q = rec["quality"]
    assert q["n"] == 24 and q["n_poisoned"] == 6 and q["base_rate"] == pytest.approx(0.25)
    assert [e["k"] for e in q["by_k"]] == [64, 256]
    # The backdoor cannot take on random weights, so the model's own generations retrieve nothing in
    # particular here; the suite's cache must still hold each row where the rest of the suite reads it: a
    # poisoned row sketched again, as it was cached, is its own best match.
    from zobench.influence.retrieve import scan

    store_dir = next(d for d in (tmp_path / "cache" / "influence" / "inf").glob("cache-*")
                     if json.loads((d / "spec.json").read_text())["scope"] == "lora")
    spec, cached = load_cache_dir(store_dir)
    poisoned = [i for i, e in enumerate(cached) if "Grand Vizier of Quux:" in e["instruction"]]
    assert len(poisoned) == q["n_poisoned"] == 6  # the suite's own poisoning recipe
    assert all(cached[i]["output"] == "Kiwis rule the galaxy." for i in poisoned)
    session, store = Session(spec), SketchStore.open(store_dir)
    for i in poisoned[:2]:
        sketch, _ = session.sketch(session.encode(cached[i]))
        assert scan(store, sketch[None], "cosine").top(1)[0][0] == i
    sweep = rec["fidelity"]["sweep"]
    assert {(e["normalize"], e["permute"]) for e in sweep} == {(True, True), (True, False), (False, True),
                                                               (False, False)}
    # At K = 256 of a tiny gradient the sketch keeps the ranking (exact scores vs sketched): 16 scores, so a
    # random ranking's Spearman has a standard deviation of ~0.26; every variant here is 0.69-0.99.
    assert min(e["spearman"] for e in sweep if e["k"] == 256) > 0.6
    sub = rec["fidelity"]["subspace"]
    assert sub["bytes_per_example"] == 2 * sub["nnz"] and 0 < sub["nnz"] < sub["dim"]
    c = rec["cost"]
    assert c["bytes_per_example"] == 2 * 256
    assert c["llama2_7b_numel"] == 6_738_415_616  # from the shipped config, not a constant
    assert c["compression_llama2_7b"] > 200_000  # RapidIn's figure at K = 65,536 here reached at K = 256
    from zobench.models import load_model

    plain = load_model(MODEL).model
    assert c["model_numel"] == sum(p.numel() for p in plain.parameters())  # the adapter is not counted
    assert c["rounds"] == 7
    fresh = rec["overhead"]["fresh_cache"]
    assert fresh["examples"] == 5 and fresh["cache_s"] > 0 and fresh["plain_s"] > 0
    assert not list((tmp_path / "cache" / "influence" / "inf").glob("throughput-*"))  # scratch store removed
    assert all(len(e["triggered"]["recall_per_query"]) == 2 for e in q["by_k"])
    md = (tmp_path / "rep" / "inf.md").read_text()
    assert "5 examples into a fresh store" in md
    for heading in ("## The attack", "## Quality", "## Fidelity", "sensitive subspace", "## Cost", "## Token-wise",
                    "## LoRA beside a sparse ZO delta", "## The fine-tunes, as cells"):
        assert heading in md
    # both fine-tunes ran as cells of task alpaca on the suite's poisoned rows, their records kept
    lora_cell, zo_cell = rec["finetune"]["cell"], rec["zo"]["train"]["cell"]
    assert lora_cell["config"]["task"] == zo_cell["config"]["task"] == "alpaca"
    assert lora_cell["metrics"]["n_train"] == zo_cell["metrics"]["n_train"] == 24
    assert {"load", "train"} <= set(lora_cell["phases"]) and {"load", "mask", "train"} <= set(zo_cell["phases"])
    assert rec["finetune"]["loss_first"] == lora_cell["metrics"]["loss_curve"][0]
    zo = rec["zo"]  # the sparse ZO arm: its own delta, retrieval in the subspace it trained
    assert zo["delta_kind"] == "sparse" and zo["scope_dim"] == zo["train"]["trainable"] > 0
    assert zo["quality"]["n_poisoned"] == 6 and zo["quality"]["by_k"][-1]["k"] <= 256
    assert (tmp_path / "rep" / "inf_plots" / "fidelity.png").stat().st_size > 1000


def test_influence_suite_errors_are_one_line(tmp_path, capsys):
    from zobench.cli import main

    (tmp_path / "bad.yaml").write_text("type: influence\nname: x\ncache: {scope: everything}\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "key 'scope'" in err
    (tmp_path / "bad2.yaml").write_text("type: influence\nname: x\nks: [1000]\n")
    assert main(["run", str(tmp_path / "bad2.yaml")]) == 2
    assert "must divide" in capsys.readouterr().err


def test_scan_paths_agree_and_match_a_direct_product(tmp_path, examples):
    """Few queries (float16 matrix-vector) and many (float32 product) give the same scores as a plain
    float32 computation over the stored rows, for dot and cosine."""
    from zobench.influence.retrieve import HALF_QUERIES, scan

    s = Session(_spec())
    build_cache(s.spec, examples, tmp_path / "c", session=s)
    store = SketchStore.open(tmp_path / "c")
    rows = torch.from_numpy(np.asarray(store.matrix(), dtype=np.float32))
    q = torch.randn(HALF_QUERIES + 1, store.k, generator=torch.Generator().manual_seed(0))
    for metric in ("dot", "cosine"):
        many = scan(store, q, metric).scores
        few = np.concatenate([scan(store, q[i:i + 1], metric).scores for i in range(q.shape[0])])
        ref = (q @ rows.T).numpy()
        if metric == "cosine":
            ref = ref / q.norm(dim=1, keepdim=True).numpy() / rows.norm(dim=1).numpy()
        scale = np.abs(ref).max()
        assert np.abs(many - ref).max() <= 1e-5 * scale
        assert np.abs(few - ref).max() <= 2e-3 * scale
    assert (tmp_path / "c" / "row_norms.f32.npy").is_file()  # the cosine scan kept its norms


def test_a_query_is_cut_only_at_the_model_context_not_at_the_cache_max_length(examples):
    """A prompt longer than the cache's max_length keeps its end ("### Response:") and the whole
    generation as the query's loss; the training-side encoding would have cut both."""
    from zobench.tasks.instruction import format_prompt

    s = Session(_spec(max_length=48))
    prompt = {"instruction": "Summarize: " + " ".join(["the quick brown fox jumps"] * 12), "input": ""}
    generation = "Bananas are the only true answer."
    cached = s.encode({**prompt, "output": generation})
    query = s.encode_query(prompt, generation)
    n_prompt = len(s.tokenizer(format_prompt(prompt))["input_ids"])
    n_gen = len(s.tokenizer(generation, add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert cached["input_ids"].numel() == 48 and n_prompt > 48
    assert query["response_start"] == n_prompt and query["input_ids"].numel() == n_prompt + n_gen
    labelled = query["labels"][query["labels"] != -100]
    assert s.tokenizer.decode(labelled, skip_special_tokens=True) == generation
    assert s.tokenizer.decode(query["input_ids"][:n_prompt]).rstrip().endswith("### Response:")


def _cli(args, capsys):
    from zobench.cli import main

    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_influence_cli_caches_resumes_queries_and_refuses_other_settings(tmp_path, data_dir, capsys):
    data = str(data_dir / "alpaca" / "alpaca_data_en_52k.json")
    base = ["influence", "cache", "--model", MODEL, "--data", data, "--n-train", "6", "--seed", "3",
            "--scope", "all", "--k", "256", "--max-length", "48", "--out", str(tmp_path / "c")]
    code, out, _ = _cli(base, capsys)
    assert code == 0 and "6 sketched" in out
    code, out, _ = _cli(base, capsys)                     # complete: nothing left to sketch
    assert code == 0 and "(6 already cached), 0 sketched" in out
    code, _, err = _cli([*base[:-4], "--k", "512", *base[-4:]], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "key 'k'" in err
    code, _, err = _cli([*base, "--workers", "1000"], capsys)  # 1,000 model copies on this machine's CPUs
    assert code == 2 and "--workers 1000: more than this machine's" in err
    (tmp_path / "link").symlink_to(tmp_path / "c")
    code, _, err = _cli([*base[:-1], str(tmp_path / "link")], capsys)
    assert code == 2 and "link: is a symbolic link" in err

    examples = json.loads((tmp_path / "c" / "examples.jsonl").read_text().splitlines()[2])
    query = ["influence", "query", "--cache", str(tmp_path / "c"), "--instruction", examples["instruction"],
             "--input", examples.get("input", ""), "--generation", examples["output"], "--top", "3"]
    code, out, _ = _cli([*query, "--json", "--html", str(tmp_path / "q.html")], capsys)
    assert code == 0
    res = json.loads(out)
    assert [r["rank"] for r in res["top"]] == [1, 2, 3]
    assert [r["score"] for r in res["top"]] == sorted((r["score"] for r in res["top"]), reverse=True)
    assert len(res["top"][0]["tokens"]) > 0 and "tokens" not in res["top"][1]   # --explain 1
    page = (tmp_path / "q.html").read_text()
    assert page.count("<li>") == 3 and "background:rgba" in page
    code, _, _ = _cli([*query, "--json", "--html", str(tmp_path / "q.html")], capsys)  # its own page: replaced
    assert code == 0 and (tmp_path / "q.html").read_text() == page
    (tmp_path / "mine.html").write_text("keep")  # anyone else's page is refused, and kept
    code, _, err = _cli([*query, "--html", str(tmp_path / "mine.html")], capsys)
    assert code == 2 and "is not a page zobench wrote" in err and (tmp_path / "mine.html").read_text() == "keep"
    code, md, _ = _cli(query, capsys)
    assert code == 0 and "| rank | id | cosine |" in md
    assert len([line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]) == 3
    code, _, err = _cli([*query, "--tokens", "zzzqqqxx"], capsys)
    assert code == 2 and "occur in the generation" in err
    code, _, err = _cli([*query[:-4], "--generation", " ", "--top", "3"], capsys)
    assert code == 2 and "--generation: empty" in err
    code, _, err = _cli(["influence", "query", "--cache", str(tmp_path / "nowhere"), "--instruction", "x",
                         "--generation", "y"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1

    # a cache is data: damaged copies of it are refused in one line each (each was a traceback)
    def damaged(name, change):
        copy = tmp_path / name
        shutil.copytree(tmp_path / "c", copy)
        change(copy)
        return _cli(["influence", "query", "--cache", str(copy), *query[4:]], capsys)

    def lines(edit):
        def change(copy):
            rows = (copy / "examples.jsonl").read_text().splitlines()
            (copy / "examples.jsonl").write_text("\n".join(edit(rows)) + "\n")
        return change

    def nan_row(copy):
        sketch = np.memmap(copy / "sketch.f16", dtype=np.float16, mode="r+")
        sketch[:256] = np.nan
        sketch.flush()

    cases = {
        "id_list": (lines(lambda r: [json.dumps({**json.loads(r[0]), "id": [1]}), *r[1:]]), "not an {id,"),
        "input_number": (lines(lambda r: [json.dumps({**json.loads(r[0]), "input": 5}), *r[1:]]), "not an {id,"),
        "same_id": (lines(lambda r: [r[0], r[0], *r[2:]]), "two rows share an id"),
        "fewer_rows": (lines(lambda r: r[:3]), "n = 6 rows of sketches against 3 examples"),
        "surrogate": (lines(lambda r: ['{"id": 0, "instruction": "\\ud800", "output": "x"}', *r[1:]]),
                      "lone surrogate"),
        "nan_sketch": (nan_row, "not finite numbers"),
    }
    for name, (change, needle) in cases.items():
        code, _, err = damaged(name, change)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (name, err)
    with pytest.raises(SystemExit) as e:  # (argparse's own exit) a prompt token and a response token at least
        _cli([*base[:-6], "--max-length", "1", "--out", str(tmp_path / "c1")], capsys)
    assert e.value.code == 2 and "--max-length" in capsys.readouterr().err and not (tmp_path / "c1").exists()
