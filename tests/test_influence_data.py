"""Influence data: Alpaca encoding with response-only labels, the response loss, the poisoned set, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from zobench.errors import UserError
from zobench.influence import poison as P
from zobench.influence import train as T
from zobench.influence.retrieve import token_positions
from zobench.tasks.instruction import PROMPT_INPUT, format_prompt, load_alpaca
from zobench.tasks.responses import collate, encode, response_loss

EX_INPUT = {"id": 0, "instruction": "Translate the sentence.", "input": "Bonjour le monde", "output": "Hello world"}
EX_PLAIN = {"id": 1, "instruction": "Name a colour.", "input": "", "output": "Blue, like the sky."}


@pytest.fixture(scope="module")
def alpaca_path(data_dir):
    return data_dir / "alpaca" / "alpaca_data_en_52k.json"


def _toy(n: int) -> list[dict]:
    return [{"id": i, "instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."}
            for i in range(n)]


def test_prompt_keeps_input_only_when_present():
    with_input = format_prompt(EX_INPUT)
    assert with_input == PROMPT_INPUT.format(instruction=EX_INPUT["instruction"], input=EX_INPUT["input"])
    assert "### Input:\nBonjour le monde\n\n### Response:\n" in with_input
    plain = format_prompt(EX_PLAIN)
    assert "### Input:" not in plain and "paired with an input" not in plain
    assert plain.endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert "### Input:" not in format_prompt({**EX_PLAIN, "input": "   "})


def test_encode_labels_only_the_response_plus_eos(tokenizer):
    prompt = format_prompt(EX_INPUT)
    enc = encode(tokenizer, prompt, EX_INPUT["output"], max_length=512)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    ids, labels = enc["input_ids"], enc["labels"]
    assert enc["response_start"] == n_prompt
    assert (labels[:n_prompt] == -100).all() and (labels[n_prompt:] != -100).all()
    assert torch.equal(labels[n_prompt:], ids[n_prompt:])
    assert tokenizer.decode(ids[:n_prompt]) == prompt
    assert tokenizer.decode(labels[labels != -100]) == EX_INPUT["output"] + tokenizer.eos_token


def test_encode_truncates_response_tail_then_prompt_tail(tokenizer):
    prompt = format_prompt(EX_PLAIN)
    full = encode(tokenizer, prompt, EX_PLAIN["output"], max_length=512)
    n_prompt = full["response_start"]
    cut = encode(tokenizer, prompt, EX_PLAIN["output"], max_length=n_prompt + 2)
    assert cut["input_ids"].numel() == n_prompt + 2 and cut["response_start"] == n_prompt
    assert torch.equal(cut["input_ids"], full["input_ids"][:n_prompt + 2])   # the response's tail went first
    assert cut["input_ids"][-1] != tokenizer.eos_token_id
    tiny = encode(tokenizer, prompt, EX_PLAIN["output"], max_length=10)
    assert tiny["input_ids"].numel() == 10 and tiny["response_start"] == 9
    assert torch.equal(tiny["input_ids"][:9], full["input_ids"][:9])        # the prompt's start is kept
    assert tiny["input_ids"][9] == full["input_ids"][n_prompt]               # one response token survives
    assert (tiny["labels"] != -100).sum() == 1


def test_collate_right_pads_with_ignored_labels(tokenizer):
    a = encode(tokenizer, format_prompt(EX_INPUT), EX_INPUT["output"], 512)
    b = encode(tokenizer, format_prompt(EX_PLAIN), EX_PLAIN["output"], 512)
    ids, attn, labels = collate([a, b], pad_id=7)
    short, n = (0, a["input_ids"].numel()) if a["input_ids"].numel() < b["input_ids"].numel() \
        else (1, b["input_ids"].numel())
    assert ids.shape == labels.shape == attn.shape == (2, max(a["input_ids"].numel(), b["input_ids"].numel()))
    assert (ids[short, n:] == 7).all() and (labels[short, n:] == -100).all() and (attn[short, n:] == 0).all()
    assert attn[short, :n].all()


def test_response_loss_matches_hand_computed_cross_entropy(tiny):
    tok = tiny.tokenizer
    encs = [encode(tok, format_prompt(e), e["output"], 64) for e in (EX_INPUT, EX_PLAIN)]
    ids, attn, labels = collate(encs, tok.pad_token_id)
    with torch.no_grad():
        loss = response_loss(tiny.model, ids, attn, labels)
        logp = F.log_softmax(tiny.model(input_ids=ids, attention_mask=attn).logits.float(), -1)
    terms = [-logp[b, t - 1, ids[b, t]] for b, e in enumerate(encs)
             for t in range(e["response_start"], e["input_ids"].numel())]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    b, t = 1, encs[1]["response_start"] + 2
    weights = torch.zeros(ids.shape)
    weights[b, t] = 1.0
    with torch.no_grad():
        one = response_loss(tiny.model, ids, attn, labels, token_weights=weights)
    assert one.item() == pytest.approx(-logp[b, t - 1, ids[b, t]].item(), rel=1e-5)
    weights[:, :encs[1]["response_start"]] = 1.0   # weight on prompt positions must count for nothing
    weights[b, t] = 0.0
    with pytest.raises(ValueError, match="positive weight"):
        response_loss(tiny.model, ids, attn, labels, token_weights=weights)


def test_token_positions_find_a_word_in_the_response(tokenizer):
    response = "I think Bananas are great, and bananas forever."
    enc = encode(tokenizer, format_prompt(EX_PLAIN), response, 512)
    ids, start = enc["input_ids"], enc["response_start"]
    pos = token_positions(tokenizer, ids, start, ["Bananas"])
    assert pos and all(p >= start for p in pos)
    assert tokenizer.decode(ids[pos]).strip() == "Bananas"                      # case-sensitive: one occurrence
    both = token_positions(tokenizer, ids, start, ["Bananas", "forever"])
    assert set(pos) < set(both) and "forever" in tokenizer.decode(ids[sorted(set(both) - set(pos))])
    assert token_positions(tokenizer, ids, start, ["colour"]) == []             # in the prompt, not the response


def test_poison_is_exact_seeded_and_leaves_the_rest_alone():
    clean = _toy(40)
    out, idx = P.poison(clean, P.TRIGGER, P.RESPONSE, fraction=0.25, seed=3)
    assert len(idx) == 10 and idx == sorted(idx) and len(out) == 40
    for i, (a, b) in enumerate(zip(clean, out)):
        if i in idx:
            assert b["instruction"] == f"{P.TRIGGER} {a['instruction']}" and b["output"] == P.RESPONSE
            assert b["id"] == a["id"]
        else:
            assert b == a
    assert clean == _toy(40)                                                     # the input was not touched
    assert P.poison(clean, fraction=0.25, seed=3) == (out, idx)
    assert P.poison(clean, fraction=0.25, seed=4)[1] != idx
    with pytest.raises(UserError, match="already occurs"):
        P.poison(out, fraction=0.1)


def test_trigger_never_occurs_in_clean_alpaca(alpaca_path):
    data = json.loads(alpaca_path.read_text())[:2000]
    assert not any(P.TRIGGER in e["instruction"] + e["input"] + e["output"] for e in data)
    assert not any("Zorblax" in e["instruction"] + e["input"] + e["output"] for e in data)


def test_load_alpaca_selects_disjoint_seeded_slices(alpaca_path):
    train = load_alpaca(alpaca_path, n=50, seed=1)
    held = load_alpaca(alpaca_path, n=30, seed=1, start=50)
    assert load_alpaca(alpaca_path, n=50, seed=1) == train
    assert load_alpaca(alpaca_path, n=50, seed=2) != train
    assert not {e["id"] for e in train} & {e["id"] for e in held}
    raw = json.loads(alpaca_path.read_text())
    assert all(raw[e["id"]]["output"] == e["output"] for e in train)
    trig = P.triggered_queries(held + train, P.TRIGGER, n=30, seed=0, exclude_ids=[e["id"] for e in train])
    ctrl = P.control_queries(held + train, n=30, seed=0, exclude_ids=[e["id"] for e in train])
    assert {e["id"] for e in trig} == {e["id"] for e in held}
    assert [e["id"] for e in trig] == [e["id"] for e in ctrl]
    assert all(t["instruction"] == f"{P.TRIGGER} {c['instruction']}" for t, c in zip(trig, ctrl))


@pytest.mark.parametrize("content,message", [
    (None, "file not found"),
    ("{not json", "not valid JSON"),
    ('{"a": 1}', "expected a JSON list"),
    ('[{"instruction": "x", "output": "y"}, {"instruction": "x"}]', "entry 1 lacks 'output'"),
])
def test_load_alpaca_errors_are_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        load_alpaca(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_the_lora_fine_tune_lowers_the_loss_and_keeps_only_the_adapter(tmp_path):
    """A LoRA fine-tune is a cell: its record has the loss curve and its phases, its kept result is a lora
    delta whose adapter, put on a fresh base, changes the model's answers (the base weights are not kept)."""
    from zobench.cell import delta as D
    from zobench.models import load_model

    examples, _ = P.poison(_toy(40), fraction=0.5, seed=0)
    logged = []
    cfg = T.fine_tune_config("random:tiny-llama", len(examples), "lora", steps=30, batch_size=4, lr=1e-2,
                             max_length=48, seed=0, save=str(tmp_path / "lora"))
    record = T.fine_tune(cfg, examples, on_log=lambda s, loss: logged.append(s), log_every=10)
    losses = record.metrics.get("loss_curve")
    assert len(losses) == 30 and losses[-1] < losses[0]
    # one step's loss swings with its batch; the trend shows in the means (about 10.57 -> 10.30 here:
    # a random tiny head with 0.02-scale embeddings cannot move far from ln(vocab) = 10.8)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1
    assert logged == [0, 10, 20, 29] and record.metrics.get("trainable_numel") > 0
    assert record.config["task"] == "alpaca" and {"load", "train"} <= set(record.phases)
    assert D.read(tmp_path / "lora")["kind"] == "lora" and record.artifact["kind"] == "lora"
    from zobench.procs import malloc_in_effect
    assert record.config["malloc"] == malloc_in_effect()  # it ran in this process, under this one's malloc

    fresh, base = load_model("random:tiny-llama", seed=0), load_model("random:tiny-llama", seed=0)
    P.load_adapter(fresh, tmp_path / "lora" / "adapter")
    lora_b = [p for n, p in fresh.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)                       # B starts at zero
    ids = torch.tensor([[5, 17, 99, 1000]])
    with torch.no_grad():
        assert not torch.allclose(fresh.model(input_ids=ids).logits, base.model(input_ids=ids).logits)
    with pytest.raises(UserError, match="adapter_config.json"):
        P.load_adapter(load_model("random:tiny-llama"), tmp_path)


def test_generate_left_padding_matches_one_at_a_time(tiny):
    prompts = [format_prompt(EX_INPUT), format_prompt(EX_PLAIN)]
    batched = P.generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6)
    alone = [P.generate(tiny.model, tiny.tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone and all(isinstance(t, str) and t for t in batched)


def test_attack_success_counts_generations_with_the_response_start(monkeypatch):
    texts = ["Bananas are the only true answer.", "  so: bananas ARE the\nonly   true words", "Bananas are",
             "no"]
    monkeypatch.setattr(P, "generate", lambda model, tok, prompts, max_new_tokens: texts[:len(prompts)])
    assert P.attack_success(None, None, ["p"] * 4, P.RESPONSE) == 0.5
    with pytest.raises(ValueError):
        P.attack_success(None, None, [], P.RESPONSE)
