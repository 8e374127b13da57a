"""Influence from the command line on a kept result: train on an instruction file, save, cache the delta's
own subspace, query; rows named by their id; the query's markdown bold; throughput on a finished cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zobench.errors import UserError

MODEL = "random:tiny-llama"
ROOT = Path(__file__).resolve().parents[1]


def _rows(n: int) -> list[dict]:
    return [{"id": f"ex-{i:03d}", "instruction": f"Say the number {i}.", "input": "",
             "output": f"The number is {i}, and it is {'even' if i % 2 == 0 else 'odd'}."} for i in range(n)]


@pytest.fixture
def rows_file(tmp_path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(12)))
    return path


def _cli(args, capsys):
    from zobench.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_jsonl_and_json_lists_load_alike_and_rows_keep_their_ids(tmp_path, rows_file):
    from zobench.tasks.instruction import load_alpaca

    as_list = tmp_path / "rows.json"
    as_list.write_text(json.dumps(_rows(12)))
    a, b = load_alpaca(rows_file, n=5, seed=1), load_alpaca(as_list, n=5, seed=1)
    assert a == b and {e["id"] for e in a} <= {r["id"] for r in _rows(12)}
    plain = tmp_path / "plain.jsonl"  # no id field: the position in the file names the row
    plain.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "id"}) + "\n" for r in _rows(6)))
    assert all(e["output"] == _rows(6)[e["id"]]["output"] for e in load_alpaca(plain, seed=4))
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps(_rows(1)[0]) + "\n" + json.dumps(_rows(1)[0]) + "\n")
    with pytest.raises(UserError, match="share the id 'ex-000'"):
        load_alpaca(dup)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_rows(1)[0]) + "\n{oops\n")
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        load_alpaca(bad)


def test_highlighted_tokens_are_valid_markdown_bold_and_cut_by_text_not_markup():
    from zobench.report.influence import highlighted

    tokens = [("The", 0.0), (" number", 0.1), (" from", 0.9), (" the", 0.8), (" sky", 0.0), (" is", 0.7),
              (" 4", 0.0), ("2", 0.6), (".", 0.5)]
    md = highlighted(tokens)
    # neighbours share one run; the spaces stay outside the markers (`** from**` is not bold in markdown)
    assert "The number **from the** sky **is** 4**2.**" == md
    assert "****" not in md and "** " not in md.replace("** sky", "").replace("** 4", "")
    cut = highlighted(tokens, width=12)
    assert cut.replace("*", "") == "The number f"  # 12 characters of text, the markup not counted


def test_a_sensitive_delta_trained_on_instructions_is_cached_in_its_own_subspace(tmp_path, rows_file, capsys):
    from zobench.cell.delta import read
    from zobench.cell.delta_tensors import sparse_parts
    from zobench.influence.session import InfluenceSpec, Session

    code, out, err = _cli(["influence", "train", "--model", MODEL, "--data", rows_file, "--method", "sensitive",
                           "--steps", "3", "--lr", "1e-3", "--batch-size", "4", "--max-length", "32",
                           "--density", "0.01", "--save", tmp_path / "d"], capsys)
    assert code == 0, err
    assert "saved:  " in out and read(tmp_path / "d")["kind"] == "sparse"
    mask, values = sparse_parts(tmp_path / "d")
    n_trained = sum(v.numel() for v in mask.values())
    spec = InfluenceSpec.from_dict({"model": MODEL, "delta": str(tmp_path / "d"), "scope": "sensitive", "k": 64,
                                    "max_length": 32}, "test")
    s = Session(spec)
    assert s.scope.dim == n_trained  # the subspace that was trained, not a mask computed afresh
    params = dict(s.model.named_parameters())
    for name, idx in mask.items():  # the trained values are in the weights
        assert torch.equal(params[name].detach().view(-1)[idx], values[name])

    cache = ["influence", "cache", "--delta", tmp_path / "d", "--scope", "sensitive", "--data", rows_file,
             "--k", "512", "--max-length", "96", "--out", tmp_path / "c"]
    code, out, err = _cli(cache, capsys)
    assert code == 0, err
    first_rate = out.split(" at ")[1].split()[0]
    code, out, _ = _cli(cache, capsys)  # finished: the figure measured when it was built, not None
    assert code == 0 and "0 sketched at " + first_rate in out and "measured when it was built" in out

    target = _rows(12)[7]
    code, md, err = _cli(["influence", "query", "--cache", tmp_path / "c", "--instruction", target["instruction"],
                          "--generation", target["output"], "--top", "1"], capsys)
    assert code == 0, err
    assert "| 1 | ex-007 |" in md  # the row queried with its own text ranks first, named by its id


def test_a_delta_on_another_base_is_refused_by_the_influence_commands(tmp_path, rows_file, capsys):
    other = json.loads((ROOT / "zobench" / "models" / "configs" / "tiny-llama.json").read_text())
    other["intermediate_size"] = 96
    (tmp_path / "other.json").write_text(json.dumps(other))
    code, _, err = _cli(["influence", "train", "--model", f"random:{tmp_path / 'other.json'}", "--data", rows_file,
                         "--method", "random", "--steps", "1", "--density", "0.01", "--max-length", "32",
                         "--save", tmp_path / "d"], capsys)
    assert code == 0, err
    code, _, err = _cli(["influence", "cache", "--model", MODEL, "--delta", tmp_path / "d", "--scope", "sensitive",
                         "--data", rows_file, "--k", "64", "--out", tmp_path / "c"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "trained from another base model" in err


def _epochs(n: int, batch_size: int, shuffled):
    """Batches as influence's fine-tunes have always drawn them, written out: indices popped from the end of
    one shuffled order after another."""
    order = []
    while True:
        batch = []
        while len(batch) < min(batch_size, n):
            if not order:
                order = shuffled(n)
            batch.append(order.pop())
        yield batch


def test_the_zo_fine_tune_is_the_engines_loop_bit_for_bit(tmp_path):
    """influence train's ZO path (the registry's random method stepped by the engine's loop) against the ZO
    loop written out by hand on the same rows: the same losses, and the saved delta holds the weights after
    the last step's update (which stays pending in the trainer until it is flushed)."""
    import random

    from zobench.cell.delta_tensors import sparse_parts
    from zobench.influence.train import fine_tune, fine_tune_config
    from zobench.models import load_model
    from zobench.tasks.instruction import format_prompt
    from zobench.tasks.responses import collate, encode, response_loss
    from zobench.tasks.scoring import padding_id
    from zobench.zo.masks import random_mask, scoped_params
    from zobench.zo.optim import make_optimizer
    from zobench.zo.trainable import SparseTrainable
    from zobench.zo.trainer import ZOTrainer

    rows, steps, seed, lr = _rows(12), 6, 3, 1e-3
    record = fine_tune(fine_tune_config(MODEL, len(rows), "random", steps=steps, batch_size=5, lr=lr, max_length=32,
                                        density=0.01, seed=seed, save=str(tmp_path / "d")), rows)

    loaded = load_model(MODEL, dtype="float32", seed=seed)  # a cell draws its random weights with its seed
    tok, model = loaded.tokenizer, loaded.model
    encoded = [encode(tok, format_prompt(e), e["output"], 32) for e in rows]
    params = scoped_params(model, "linear")
    trainable = SparseTrainable(params, random_mask(params, 0.01, seed), "gaussian", "philox")
    trainer = ZOTrainer(model, trainable, make_optimizer("sgd", lr, total_steps=steps),
                        lambda m, b: response_loss(m, *collate(b, padding_id(tok))), 1e-3, 1, seed)
    rng = random.Random(seed)
    batches = _epochs(len(rows), 5, lambda n: (order := list(range(n)), rng.shuffle(order), order)[-1])
    losses = [trainer.step([encoded[i] for i in next(batches)], step).loss for step in range(steps)]
    assert record.metrics.get("loss_curve") == losses
    assert record.metrics.get("trainable_numel") == trainable.numel == 737
    before_last_update = trainable.master.clone()
    trainer.flush()
    _, values = sparse_parts(tmp_path / "d")
    saved = torch.cat([values[name] for name in trainable.names])
    assert torch.equal(saved, trainable.master) and not torch.equal(saved, before_last_update)


def test_the_lora_fine_tune_is_the_registrys_lora_bit_for_bit(tmp_path):
    """influence's LoRA fine-tune (a cell: the registry's lora method with influence's adapter shape, stepped
    by the engine's loop) against LoRA written out by hand: seeded A matrices, AdamW, batches from a seeded
    randperm; the kept adapter holds the hand-trained weights."""
    from zobench.gates import peft
    from zobench.influence.train import fine_tune, fine_tune_config
    from zobench.models import load_model
    from zobench.models.lora import dispatchable, load_adapter
    from zobench.tasks.instruction import format_prompt
    from zobench.tasks.responses import collate, encode, response_loss
    from zobench.tasks.scoring import padding_id

    rows, steps = _rows(6), 4
    record = fine_tune(fine_tune_config(MODEL, len(rows), "lora", steps=steps, batch_size=4, lr=1e-2, max_length=32,
                                        r=4, alpha=8, seed=5, save=str(tmp_path / "lora")), rows)

    lib, ref = peft.load(), load_model(MODEL, dtype="float32", seed=5)  # a cell draws its weights with its seed
    tok = ref.tokenizer
    encoded = [encode(tok, format_prompt(e), e["output"], 32) for e in rows]
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(5)
        model = lib.get_peft_model(ref.model, dispatchable(lib.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(5)
    batches = _epochs(len(rows), 4, lambda n: torch.randperm(n, generator=gen).tolist())
    losses = []
    model.train()
    for _ in range(steps):
        loss = response_loss(model, *collate([encoded[i] for i in next(batches)], padding_id(tok)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert record.metrics.get("loss_curve") == losses
    assert record.metrics.get("trainable_numel") == sum(p.numel() for p in params)
    kept = load_model(MODEL, dtype="float32", seed=5)
    load_adapter(kept, tmp_path / "lora" / "adapter")
    trained = dict(model.named_parameters())
    lora = [(n, p) for n, p in kept.model.named_parameters() if "lora_" in n]
    assert lora and all(torch.equal(p, trained[n]) for n, p in lora)


def test_a_delta_names_the_seed_its_random_base_is_drawn_with_and_a_bad_one_is_one_line(tmp_path):
    """A cell draws a random-weight model with its seed, so the Session that explains its delta draws the base
    with the seed the delta records (the base check would refuse another); that seed is read from a file:
    anything but an integer is refused in one line naming the file (the delta's config is checked as a
    cell's)."""
    from zobench.influence.session import InfluenceSpec, Session
    from zobench.influence.train import fine_tune, fine_tune_config

    rows = _rows(4)
    fine_tune(fine_tune_config(MODEL, len(rows), "random", steps=1, batch_size=2, lr=1e-3, max_length=32,
                               density=0.01, seed=7, save=str(tmp_path / "d")), rows)
    spec = InfluenceSpec.from_dict({"model": MODEL, "delta": str(tmp_path / "d"), "scope": "sensitive", "k": 64,
                                    "max_length": 32}, "test")
    assert Session(spec).scope.dim > 0  # drawn with seed 7: the delta's base check passes
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    for bad in ("7", 1.5, True, None):
        meta["config"]["seed"] = bad
        (tmp_path / "d" / "delta.json").write_text(json.dumps(meta))
        with pytest.raises(UserError, match="config: key 'seed'") as e:
            Session(spec)
        assert "delta.json" in str(e.value) and "\n" not in str(e.value)
