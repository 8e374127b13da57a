"""Tasks: MeZO's prompts on real rows, MeZO's sampling, input errors, and the scoring against brute force."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

from zobench.errors import UserError
from zobench.tasks import TASKS, Example, get_task, logits, scoring
from zobench.tasks.base import _carve, permutation
from zobench.tasks.generation import drop_spans, exact_match, f1_score, normalize_answer
from zobench.tasks.packaged import SST2_DIR


def first_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())


# -- prompts: MeZO's templates (large_models/templates.py) on the first real row of each file ---------------

def test_sst2_prompt(data_dir):
    row = next(get_task("sst2").parse(data_dir / "SST-2" / "train.tsv"))[1]
    ex = get_task("sst2").example(row)
    assert ex.prompt == "hide new secretions from the parental units It was"   # sentence.strip() + " It was"
    assert ex.candidates == [" terrible", " great"] and ex.label == 0


def test_rte_prompt(data_dir):
    ex = get_task("rte").example(first_jsonl(data_dir / "RTE" / "train.jsonl"))
    assert ex.prompt == ('No Weapons of Mass Destruction Found in Iraq Yet.\nDoes this mean that '
                         '"Weapons of Mass Destruction Found in Iraq." is true? Yes or No?\n')
    assert ex.candidates == ["Yes", "No"] and ex.label == 1          # not_entailment -> No


def test_cb_prompt(data_dir):
    ex = get_task("cb").example(first_jsonl(data_dir / "CB" / "train.jsonl"))
    assert ex.prompt == ('Suppose It was a complex language. Not written down but handed down. One might say it was '
                         'peeled down. Can we infer that "the language was peeled down"? Yes, No, or Maybe?\n')
    assert ex.candidates == ["Yes", "No", "Maybe"] and ex.label == 0   # entailment -> Yes


def test_copa_prompt(data_dir):
    ex = get_task("copa").example(first_jsonl(data_dir / "COPA" / "train.jsonl"))
    assert ex.prompt == "My body cast a shadow over the grass because"  # "." dropped, " because " stripped
    assert ex.candidates == [" the sun was rising.", " the grass was cut."] and ex.label == 0
    assert not ex.train_as_classification                                # mezo.sh: Copa trains as an LM
    effect = get_task("copa").example({"premise": "I dropped it.", "choice1": "I cried.", "choice2": "It broke.",
                                       "question": "effect", "label": 1})
    assert effect.prompt == "I dropped it so" and effect.candidates == [" I cried.", " it broke."]


def test_wsc_prompt(data_dir):
    ex = get_task("wsc").example(first_jsonl(data_dir / "WSC" / "train.jsonl"))
    assert ex.prompt == ('Mark told Pete many lies about himself, which Pete included in his book. He should have '
                         'been more skeptical.\nIn the previous sentence, does the pronoun "he" refer to Mark? '
                         'Yes or No?\n')
    assert ex.candidates == ["No", "Yes"] and ex.label == 0


def test_boolq_prompt(data_dir):
    row = first_jsonl(data_dir / "BoolQ" / "val.jsonl")
    ex = get_task("boolq").example(row)
    # BoolQTemplateV3 (MeZO's default): capitalized question with "?" after the passage, then a newline
    assert ex.prompt == row["passage"] + " Does ethanol take more energy make that produces?\n"
    assert ex.candidates == ["Yes", "No"] and ex.label == 1            # label false -> No


def test_squad_prompt(data_dir):
    path = data_dir / "squad" / "train-v1.1.first44articles.json"
    row = next(get_task("squad").parse(path))[1]
    ex = get_task("squad").example(row)
    assert ex.prompt == (f"Title: University_of_Notre_Dame\nContext: {row['context']}\nQuestion: To whom did the "
                         f"Virgin Mary allegedly appear in 1858 in Lourdes France?\nAnswer:")
    assert row["context"].startswith("Architecturally, the school has a Catholic character.")
    assert ex.answers == ["Saint Bernadette Soubirous"]
    assert ex.target == " Saint Bernadette Soubirous\n"                 # MeZO's verbalize ends with "\n"


def test_drop_prompt(data_dir):
    task = get_task("drop")
    train = task.read("train", data_dir)
    ex = task.example(train[0])
    assert ex.prompt == (f"Passage: {train[0]['passage']}\nQuestion: How many points did the buccaneers need to "
                         f"tie in the first?\nAnswer:")
    assert ex.answers == ["3"] and ex.target == " 3\n"
    assert len(train) == 3420 - 1                                       # the one empty answer is skipped
    val = task.example(task.read("validation", data_dir)[0])
    assert val.prompt.endswith("\nQuestion: How many percent were not Norwegian?\nAnswer:")
    assert val.answers == ["93.1", "93.1"]


def test_drop_answer_dicts():
    blank = {"day": "", "month": "", "year": ""}
    assert drop_spans([{"number": "", "date": {**blank, "month": "March", "year": "2021"}, "spans": []}]) == \
        {"spans": ["March 2021"], "types": ["date"]}
    assert drop_spans([{"number": "", "date": blank, "spans": ["a", "b"]}])["spans"] == ["a", "b"]
    assert drop_spans([{"number": "", "date": blank, "spans": []}]) is None
    assert drop_spans([{"number": "3", "date": blank, "spans": ["x"]}]) is None


def test_wic_and_multirc_official_layouts(tmp_path):
    (tmp_path / "WiC").mkdir()
    (tmp_path / "WiC" / "train.jsonl").write_text(json.dumps(
        {"word": "place", "sentence1": "Do you want to come over to my place later?",
         "sentence2": "A political system with no place for the less prominent groups.",
         "idx": 0, "label": False, "start1": 31, "start2": 27, "end1": 36, "end2": 32, "version": 1.1}) + "\n")
    ex = get_task("wic").example(get_task("wic").read("train", tmp_path)[0])
    assert ex.prompt == ('Does the word "place" have the same meaning in these two sentences? Yes, No?\n'
                         'Do you want to come over to my place later?\n'
                         'A political system with no place for the less prominent groups.\n')
    assert ex.candidates == ["No", "Yes"] and ex.label == 0

    (tmp_path / "MultiRC").mkdir()
    (tmp_path / "MultiRC" / "train.jsonl").write_text(json.dumps({"idx": 0, "version": 1.1, "passage": {
        "text": "Sent 1: Tom ran.", "questions": [{"idx": 0, "question": "Who ran?", "answers": [
            {"idx": 0, "text": "Tom", "label": 1}, {"idx": 1, "text": "Ann", "label": 0}]}]}}) + "\n")
    rows = get_task("multirc").read("train", tmp_path)
    assert len(rows) == 2                                                 # one example per answer
    exs = [get_task("multirc").example(r) for r in rows]
    assert exs[0].prompt == ('Sent 1: Tom ran.\nQuestion: Who ran?\nI found this answer "Tom". Is that correct? '
                             'Yes or No?\n')
    assert [e.label for e in exs] == [1, 0] and exs[1].candidates == ["No", "Yes"]


def test_registry_names_and_aliases():
    assert set(TASKS.names()) >= {"sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "squad", "drop"}
    assert get_task("SST-2").name == "sst2"
    assert get_task("squad").kind == "generation" and get_task("rte").kind == "classification"


# -- sampling (MeZO's run.py: one seeded permutation of train, dev at its end; test from validation) ---------

def ids(examples):
    return [ex.raw["idx"] for ex in examples]


def test_sampling_is_mezos_and_seeded(data_dir):
    task = get_task("rte")
    a = task.sample(data_dir, n_train=100, n_dev=50, n_test=60, seed=3)
    assert (len(a.train), len(a.dev), len(a.test)) == (100, 50, 60)
    order = np.random.RandomState(3).permutation(2490).tolist()          # RTE's idx is its row number
    assert ids(a.train) == order[:100] and ids(a.dev) == order[100:150]
    assert ids(a.test) == np.random.RandomState(3).permutation(277).tolist()[:60]
    assert not set(ids(a.train)) & set(ids(a.dev))
    b = task.sample(data_dir, n_train=100, n_dev=50, n_test=60, seed=3)
    assert [e.prompt for e in b.train + b.dev + b.test] == [e.prompt for e in a.train + a.dev + a.test]
    c = task.sample(data_dir, n_train=100, n_dev=50, n_test=60, seed=4)
    assert ids(c.train) != ids(a.train) and ids(c.test) != ids(a.test)


def test_small_split_is_noted_not_fatal(data_dir):
    s = get_task("cb").sample(data_dir, n_train=1000, n_dev=100, n_test=1000, seed=0)
    assert (len(s.train), len(s.dev), len(s.test)) == (150, 100, 56)     # as MeZO: dev first, train the rest
    assert "250 rows" in s.note and "whole validation split" in s.note
    assert not set(ids(s.train)) & set(ids(s.dev))


def test_boolq_carves_train_from_validation(data_dir):
    s = get_task("boolq").sample(data_dir, n_train=200, n_dev=100, n_test=300, seed=0)
    assert (len(s.train), len(s.dev), len(s.test)) == (200, 100, 300)
    assert "no train split" in s.note and "seed 0" in s.note
    parts = [set(ids(x)) for x in (s.train, s.dev, s.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert ids(s.train) == permutation(3270, 0)[:200]


def test_carve_takes_what_is_there():
    train, dev, test, note = _carve(list(range(10)), permutation(10, 0), 6, 3, 5)
    assert (len(train), len(dev), len(test)) == (6, 3, 1) and "only 10 rows" in note


def test_packaged_sst2_sample(data_dir):
    official = (data_dir / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()
    packaged = (SST2_DIR / "train.tsv").read_text(encoding="utf-8").splitlines()
    assert packaged[0] == official[0] == "sentence\tlabel" and len(packaged) == 2001
    keep = sorted(np.random.RandomState(0).permutation(len(official) - 1)[:2000].tolist())
    assert packaged[1:] == [official[1 + i] for i in keep]               # as its README says
    assert (SST2_DIR / "dev.tsv").read_bytes() == (data_dir / "SST-2" / "dev.tsv").read_bytes()
    s = get_task("sst2").sample(None, n_train=100, n_dev=20, n_test=50, seed=0)
    assert (len(s.train), len(s.dev), len(s.test)) == (100, 20, 50) and "packaged sample" in s.note


# -- errors: one line naming the file (and line) and what was expected ---------------------------------------

def test_unknown_task_suggests():
    with pytest.raises(UserError, match="did you mean 'rte'"):
        get_task("rtee")


def test_missing_file_names_it(tmp_path):
    with pytest.raises(UserError, match=r"RTE/train\.jsonl: no such file") as e:
        get_task("rte").sample(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("line, match", [
    ('{"premise": "p", "label": "entailment"}', r"train\.jsonl:2: missing key 'hypothesis'"),
    ('{"premise": "p", "hypothesis": "h", "label": "maybe"}', r"train\.jsonl:2: label 'maybe' is not one of"),
    ('{"premise": "p", ', r"train\.jsonl:2: not a JSON object"),
])
def test_malformed_row_names_file_and_line(tmp_path, line, match):
    (tmp_path / "RTE").mkdir()
    good = '{"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 0}'
    (tmp_path / "RTE" / "train.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(UserError, match=match) as e:
        get_task("rte").read("train", tmp_path)
    assert "\n" not in str(e.value)


def test_malformed_tsv_and_json(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("index\tsentence\n0\tx\n")
    with pytest.raises(UserError, match=r"train\.tsv:1: header"):
        get_task("sst2").read("train", tmp_path)
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\nno label here\n")
    with pytest.raises(UserError, match=r"train\.tsv:3: 1 tab-separated fields"):
        get_task("sst2").read("train", tmp_path)
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "dev-v1.1.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": "c", "qas": [{"question": "q", "id": "1"}]}]}]}))
    with pytest.raises(UserError, match=r"dev-v1\.1\.json: data\[0\]: missing key 'answers'"):
        get_task("squad").read("validation", tmp_path)


def test_no_data_dir_needs_one(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="pass --data-dir"):
        get_task("rte").sample(None)
    if importlib.util.find_spec("datasets") is None:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        with pytest.raises(UserError, match="pip install datasets"):
            get_task("rte").sample(None)


def test_hub_rows_in_hugging_face_layout(monkeypatch):
    """Without data_dir and with network, rows come from `datasets` in its layout (int labels, nested answers)."""
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        if path == "rajpurkar/squad":
            return [{"id": "1", "title": "T", "context": "C", "question": " Q? ",
                     "answers": {"text": ["a", "b"], "answer_start": [0, 0]}}]
        return [{"premise": f"p{i}", "hypothesis": "h", "label": i % 2, "idx": i} for i in range(6)]

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    s = get_task("rte").sample(None, n_train=3, n_dev=1, n_test=2, seed=0)
    assert calls == [("aps/super_glue", "rte", "train"), ("aps/super_glue", "rte", "validation")]
    assert [e.label for e in s.train] == [e.raw["idx"] % 2 for e in s.train] and len(s.test) == 2
    ex = get_task("squad").sample(None, n_train=1, n_dev=0, n_test=1).test[0]
    assert ex.prompt == "Title: T\nContext: C\nQuestion: Q?\nAnswer:" and ex.answers == ["a", "b"]


# -- scoring on the tiny random Llama ------------------------------------------------------------------------

def brute_scores(model, batch):
    """Per sequence, unpadded: full log_softmax, mean over the option tokens."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        seq = batch["input_ids"][i, :n]
        logp = model(input_ids=seq[None]).logits[0].float().log_softmax(-1)
        pos = batch["option_mask"][i, :n].nonzero()[:, 0]
        out.append(logp[pos - 1, seq[pos]].mean())
    return torch.stack(out)


@pytest.fixture(scope="module")
def sst2_small():
    return get_task("sst2").sample(None, n_train=8, n_dev=2, n_test=12, seed=0)


@pytest.mark.parametrize("sliced", [True, False])
def test_classification_loss_matches_brute_force(tiny, tokenizer, sst2_small, monkeypatch, sliced):
    if not sliced:    # the path for models without a boolean logits_to_keep
        monkeypatch.setattr(logits, "slices_logits", lambda model: False)
    batch = scoring.encode(sst2_small.train[:4], tokenizer, "classification")
    assert batch["input_ids"].shape[0] == 8 and batch["n_options"].tolist() == [2] * 4
    want = torch.nn.functional.cross_entropy(brute_scores(tiny.model, batch).view(4, 2), batch["labels"])
    got = scoring.loss(tiny.model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()                                                         # first-order baselines need grads
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny.model.parameters())
    with torch.inference_mode():
        torch.testing.assert_close(scoring.loss(tiny.model, batch), want.detach(), rtol=1e-5, atol=1e-5)


def test_uneven_options_loss(tiny, tokenizer):
    exs = [Example("The sky is", [" blue", " green", " made of cheese"], 2),
           Example("Two plus two is", [" four", " five"], 0)]
    batch = scoring.encode(exs, tokenizer, "classification")
    s = brute_scores(tiny.model, batch)
    want = (torch.nn.functional.cross_entropy(s[:3][None], torch.tensor([2]))
            + torch.nn.functional.cross_entropy(s[3:][None], torch.tensor([0]))) / 2
    torch.testing.assert_close(scoring.loss(tiny.model, batch), want, rtol=1e-5, atol=1e-5)


def test_option_tokens_decode_to_options(tokenizer, data_dir):
    for name in ("sst2", "rte", "cb", "copa", "wsc", "boolq"):
        exs = get_task(name).sample(data_dir, n_train=4, n_dev=0, n_test=0, seed=0).train
        batch = scoring.encode(exs, tokenizer, "classification", max_length=4096, train=False)
        flat = [c for ex in exs for c in ex.candidates]
        got = [tokenizer.decode(batch["input_ids"][i][batch["option_mask"][i]]) for i in range(len(flat))]
        assert got == flat, name
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_left_truncation_keeps_the_option(tokenizer, sst2_small):
    ex = Example("word " * 100 + "It was", [" terrible", " great"], 1)
    batch = scoring.encode([ex], tokenizer, "classification", max_length=16)
    assert batch["input_ids"].shape == (2, 16)
    assert tokenizer.decode(batch["input_ids"][1][batch["option_mask"][1]]) == " great"
    assert tokenizer.decode(batch["input_ids"][1]).endswith("It was great")
    assert scoring._truncate([1, 5, 6, 7, 8], 3, keep_first=True) == [1, 7, 8]     # BOS kept, as MeZO
    assert scoring._truncate([1, 5, 6, 7, 8], 3, keep_first=False) == [6, 7, 8]


def test_vocab_folding(tokenizer, sst2_small):
    plain = scoring.encode(sst2_small.train[:3], tokenizer, "classification")
    folded = scoring.encode(sst2_small.train[:3], tokenizer, "classification", vocab_size=1000)
    assert (folded["input_ids"] < 1000).all() and torch.equal(folded["input_ids"], plain["input_ids"] % 1000)


def test_lm_style_batches_match_brute_force(tiny, tokenizer, data_dir):
    copa = get_task("copa").sample(data_dir, n_train=3, n_dev=1, n_test=0, seed=0).train
    squad = get_task("squad").sample(data_dir, n_train=3, n_dev=1, n_test=0, seed=0).train
    for exs, kind, texts in ((copa, "classification", [e.candidates[e.label] for e in copa]),
                             (squad, "generation", [e.target for e in squad])):
        batch = scoring.encode(exs, tokenizer, kind, max_length=512)
        assert "n_options" not in batch and batch["input_ids"].shape[0] == 3
        assert [tokenizer.decode(batch["input_ids"][i][batch["option_mask"][i]]) for i in range(3)] == texts
        # MeZO's LM loss: the mean over every target token of the batch
        nll, count = 0.0, 0
        for i in range(3):
            n = int(batch["attention_mask"][i].sum())
            seq = batch["input_ids"][i, :n]
            logp = tiny.model(input_ids=seq[None]).logits[0].log_softmax(-1)
            pos = batch["option_mask"][i, :n].nonzero()[:, 0]
            nll, count = nll - logp[pos - 1, seq[pos]].sum(), count + len(pos)
        torch.testing.assert_close(scoring.loss(tiny.model, batch), nll / count, rtol=1e-5, atol=1e-5)


def test_evaluate_classification_against_brute_force(tiny, tokenizer, sst2_small):
    exs = sst2_small.test
    with torch.no_grad():
        best = brute_scores(tiny.model, scoring.encode(exs, tokenizer, "classification")).view(-1, 2).argmax(1)
    assert scoring.predict(tiny.model, tokenizer, exs, batch_size=5) == best.tolist()
    acc = scoring.evaluate(tiny.model, tokenizer, "classification", exs, batch_size=5)["accuracy"]
    gold = torch.tensor([e.label for e in exs])
    assert 0.0 <= acc <= 1.0 and acc == pytest.approx(float((best == gold).float().mean()))
    right = [Example(e.prompt, e.candidates, int(b)) for e, b in zip(exs, best)]
    wrong = [Example(e.prompt, e.candidates, 1 - int(b)) for e, b in zip(exs, best)]
    assert scoring.evaluate(tiny.model, tokenizer, "classification", right, batch_size=5) == {"accuracy": 1.0}
    assert scoring.evaluate(tiny.model, tokenizer, "classification", wrong, batch_size=5) == {"accuracy": 0.0}


def test_generation_left_padded_batch_equals_greedy_one_by_one(tiny, tokenizer):
    torch.manual_seed(1)
    with torch.no_grad():     # sharper random weights: outputs that depend on the prompt
        for p in tiny.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    prompts = ["Question: who?\nAnswer:", "Title: A long title here\nContext: some context words\nAnswer:",
               "Passage: x\nAnswer:"]
    exs = [Example(p, answers=["unused"]) for p in prompts]
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    want = []
    with torch.no_grad():
        for p in prompts:
            seq = tokenizer(p)["input_ids"]
            out = []
            for _ in range(6):
                nxt = int(tiny.model(input_ids=torch.tensor([seq + out])).logits[0, -1].argmax())
                if nxt in (newline, tokenizer.eos_token_id):
                    break
                out.append(nxt)
            want.append(tokenizer.decode(out, skip_special_tokens=True).split("\n")[0].strip())
    got = scoring.generate(tiny.model, tokenizer, exs, batch_size=3, max_length=64, max_new_tokens=6)
    assert got == want and len(set(got)) > 1
    scored = [Example(p, answers=["zzz", t]) for p, t in zip(prompts, got)]
    res = scoring.evaluate(tiny.model, tokenizer, "generation", scored, batch_size=2, max_length=64,
                           max_new_tokens=6)
    assert res["em"] == 1.0
    assert res["f1"] == pytest.approx(sum(f1_score(t, [t]) for t in got) / 3)


def test_em_f1_metrics():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the cat", ["A dog", "A cat."]) == 1.0 and exact_match("cat", ["dog"]) == 0.0
    assert f1_score("cat sat", ["the cat sat down"]) == pytest.approx(0.8)      # p = 1, r = 2/3
    assert f1_score("cat sat", ["dog", "cat sat"]) == 1.0                        # best gold answer
    assert f1_score("", ["cat"]) == 0.0 and f1_score("dog", ["cat"]) == 0.0
    assert f1_score("a cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)    # multiset overlap


def test_truncated_inputs_are_counted_exactly_where_encode_cuts(tokenizer, sst2_small):
    exs = sst2_small.test
    widths = sorted(scoring.encode([ex], tokenizer, "classification", max_length=10**6)["input_ids"].shape[1]
                    for ex in exs)
    limit = widths[len(widths) // 2]  # about half the examples are longer
    cut = 0
    for ex in exs:  # an example is cut when encoding it at the limit changes its tokens
        whole = scoring.encode([ex], tokenizer, "classification", max_length=10**6)["input_ids"]
        short = scoring.encode([ex], tokenizer, "classification", max_length=limit)["input_ids"]
        cut += whole.shape != short.shape
    assert 0 < cut < len(exs)
    assert scoring.count_truncated(exs, tokenizer, "classification", limit, train=False) == cut
    assert scoring.count_truncated(exs, tokenizer, "classification", 10**6, train=False) == 0


@pytest.mark.parametrize("name", ["sst2", "rte", "cb", "boolq", "wsc", "copa", "squad", "drop"])
def test_default_max_length_truncates_nothing(name, tokenizer, data_dir):
    from zobench.spec.catalog import TASKS
    from zobench.spec.config import CellConfig

    task = get_task(name)
    cfg = CellConfig(task=name)
    assert cfg.max_length == TASKS.get(name).max_length  # the default declared with the task's name
    splits = task.sample(str(data_dir), cfg.n_train, cfg.n_dev, cfg.n_test, 0)
    for split in ("train", "dev", "test"):
        examples = getattr(splits, split)
        assert scoring.count_truncated(examples, tokenizer, task.kind, cfg.max_length, split == "train") == 0, split


def test_a_run_that_truncates_counts_it_and_warns():
    from zobench.api import train

    rec = train(model="random:tiny-llama", task="sst2", method="forward", steps=1, warmup_steps=0,
                n_train=8, n_dev=0, n_test=4, batch_size=4, max_length=12, eval_before=False, eval_after=False)
    truncated = rec.metrics.get("truncated")
    assert truncated["max_length"] == 12 and truncated["train"] > 0 and truncated["dev"] == 0
    assert any("max_length 12 truncates" in w and "train examples" in w for w in rec.warnings)


@pytest.mark.parametrize("task_name, max_length", [("sst2", 256), ("sst2", 12), ("rte", 512), ("cb", 64)])
def test_shared_prompt_scoring_equals_one_sequence_per_option(tiny, tokenizer, data_dir, task_name, max_length):
    """One forward of the prompt scores every single-token option exactly as MeZO's one sequence per option
    does, on real rows, with and without left truncation."""
    splits = get_task(task_name).sample(str(data_dir), n_train=8, n_dev=0, n_test=0, seed=0)
    exs = splits.train
    per_option = scoring.encode(exs, tokenizer, "classification", max_length, vocab_size=tiny.vocab_size)
    shared = scoring.encode(exs, tokenizer, "classification", max_length, vocab_size=tiny.vocab_size, shared=True)
    assert "option_ids" in shared and "option_ids" not in per_option
    assert shared["input_ids"].shape[0] == len(exs) < per_option["input_ids"].shape[0]
    assert int(shared["attention_mask"].sum()) < int(per_option["attention_mask"].sum())  # the saving
    with torch.no_grad():
        a = scoring.grouped_scores(tiny.model, per_option)
        b = scoring.grouped_scores(tiny.model, shared)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
        assert float(scoring.loss(tiny.model, per_option)) == pytest.approx(float(scoring.loss(tiny.model, shared)),
                                                                           abs=1e-5)


def test_multi_token_options_fall_back_to_one_sequence_per_option(tokenizer):
    ex = Example("The cause was", [" the rain that fell all night", " a dog"], 0)
    batch = scoring.encode([ex], tokenizer, "classification", 64, shared=True)
    assert "option_ids" not in batch and batch["input_ids"].shape[0] == 2


def test_dev_drawn_like_test_is_disjoint_fixed_across_seeds_and_train_is_elsewhere(data_dir):
    """dev_from: validation: dev and test are disjoint parts of SST-2's validation sentences, the same for
    every seed (so runs pair example by example), and train comes from the train split."""
    from zobench.tasks import get_task

    task = get_task("sst2")
    a = task.sample(data_dir, n_train=300, n_dev=200, n_test=872, seed=0, dev_from="validation")
    b = task.sample(data_dir, n_train=300, n_dev=200, n_test=872, seed=1, dev_from="validation")
    ids = lambda xs: [e.id for e in xs]  # noqa: E731
    assert len(a.dev) == 200 and len(a.test) == 872 - 200
    assert not set(ids(a.dev)) & set(ids(a.test))
    assert ids(a.dev) == ids(b.dev) and ids(a.test) == ids(b.test)
    assert ids(a.train) != ids(b.train)  # train is drawn per seed
    valid_prompts = {e.prompt for e in task.sample(data_dir, 0, 0, 872, seed=0).test}
    assert {e.prompt for e in a.dev} <= valid_prompts and {e.prompt for e in a.test} <= valid_prompts
    assert "dev is 200 rows of the validation split" in a.note


def test_train_dev_and_test_rows_are_disjoint_within_every_seed(data_dir):
    from zobench.tasks import get_task

    task = get_task("sst2")
    for dev_from in ("train", "validation"):
        for seed in (0, 1, 2):
            s = task.sample(data_dir, n_train=500, n_dev=100, n_test=300, seed=seed, dev_from=dev_from)
            train = {("train", e.id) for e in s.train}
            dev = {("validation" if dev_from == "validation" else "train", e.id) for e in s.dev}
            test = {("validation", e.id) for e in s.test}
            assert not train & dev and not dev & test and not train & test, (dev_from, seed)


def test_alpaca_splits_are_seeded_disjoint_slices_of_one_shuffle(data_dir):
    from zobench.tasks import get_task

    task = get_task("alpaca")
    a, b = task.sample(data_dir, 8, 4, 6, seed=1), task.sample(data_dir, 8, 4, 6, seed=1)
    ids = [[e.raw["id"] for e in split] for split in (a.train, a.dev, a.test)]
    assert [len(x) for x in ids] == [8, 4, 6] and len(set(sum(ids, []))) == 18        # disjoint
    assert ids == [[e.raw["id"] for e in split] for split in (b.train, b.dev, b.test)]  # seeded
    assert ids[0] != [e.raw["id"] for e in task.sample(data_dir, 8, 4, 6, seed=2).train]
    # the rows `zobench influence train --n-train 8 --seed 1` takes from the same file
    from zobench.tasks.instruction import load_alpaca

    picked = load_alpaca(data_dir / "alpaca" / "alpaca_data_en_52k.json", n=8, seed=1)
    assert ids[0] == [r["id"] for r in picked]
    ex = a.train[0]
    assert ex.prompt.endswith("### Response:\n") and ex.target == ex.raw["output"] and ex.id == ex.raw["id"]
    with pytest.raises(UserError, match="dev comes from it"):
        task.sample(data_dir, 8, 4, 6, dev_from="validation")


def test_alpaca_is_scored_by_its_response_loss_pooled_over_tokens(tiny, tokenizer):
    """The instruction kind's evaluation is the training loss on held-out rows: batched, it equals the
    response loss of the whole split at once; each example's own loss is kept beside it; the truncation
    count is what encoding cuts."""
    from zobench.tasks.instruction import Alpaca
    from zobench.tasks.responses import collate, count_truncated, encode, evaluate, response_loss
    from zobench.tasks.scoring import padding_id

    rows = [{"id": i, "instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i + 1)))}
            for i in range(5)]
    examples = Alpaca().splits_of(rows).train
    details = {}
    got = evaluate(tiny.model, tokenizer, examples, batch_size=2, max_length=64, details=details)
    batch = collate([encode(tokenizer, e.prompt, e.target, 64) for e in examples], padding_id(tokenizer))
    with torch.no_grad():
        whole = response_loss(tiny.model, *batch).item()
    assert got["loss"] == pytest.approx(whole, rel=1e-5)
    assert details["id"].tolist() == [0, 1, 2, 3, 4] and len(details["loss"]) == 5
    lengths = [len(encode(tokenizer, e.prompt, e.target, 10_000)["input_ids"]) for e in examples]
    cut = sorted(lengths)[2]
    assert count_truncated(examples, tokenizer, cut) == sum(n > cut for n in lengths) > 0
