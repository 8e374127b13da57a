"""Packed rows: the real tokens of several sequences in one row, positions restarted, no padding.

The scored logits must be the padded forward's (float32 tolerance) on every packed model type, on real rows
(shared prompts and one sequence per option), and a model type that cannot take packed rows keeps padding.
"""

from __future__ import annotations

import pytest
import torch

from zobench.tasks import get_task, logits, scoring


def rows_seen(model, fn):
    """Run ``fn`` and return the batch shapes the model's input embedding saw."""
    shapes = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    try:
        out = fn()
    finally:
        handle.remove()
    return out, shapes


def right_padded(lengths: list[int], vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=g)
    attn = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    keep = (torch.rand(ids.shape, generator=g) < 0.3) & attn.bool()
    keep[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = True  # every sequence's last token too
    return ids, attn, keep


def test_rows_hold_every_sequence_once_and_are_never_wider_than_the_padding():
    lengths = [45, 3, 17, 9, 30, 12, 5, 44, 20, 8, 1, 25]
    rows = logits.pack_rows(lengths, max(lengths))
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)
    assert len(rows) < len(lengths)  # the point: fewer rows than sequences
    assert rows == logits.pack_rows(lengths, max(lengths))  # a function of the lengths alone
    assert logits.pack_rows([4, 4, 4], 4) == [[0], [1], [2]]  # equal lengths that fill a row: padding's rows


def tiny_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "gpt2":
        kw = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("model_type", logits.PACKED_MODEL_TYPES)
def test_packed_logits_equal_the_padded_ones(model_type):
    model = tiny_model(model_type)
    assert logits.packs(model)
    ids, attn, keep = right_padded([23, 4, 11, 7, 19, 2, 9, 15], 128)
    with torch.no_grad():
        padded, seen_padded = rows_seen(model, lambda: logits.kept_logits(model, ids, attn, keep))
        packed, seen_packed = rows_seen(model, lambda: logits.kept_logits(model, ids, attn, keep, pack=True))
    assert seen_padded == [(8, 23)] and seen_packed[0][0] < 8 and seen_packed[0][1] <= 23  # it did pack
    assert packed.shape == padded.shape == (int(keep.sum()), 128)
    assert torch.allclose(packed, padded, atol=1e-5, rtol=1e-5), (packed - padded).abs().max()


def test_a_model_that_cannot_take_packed_rows_keeps_its_padding():
    model = tiny_model("gpt2")
    assert not logits.packs(model)
    ids, attn, keep = right_padded([12, 3, 7], 128)
    with torch.no_grad():
        packed, seen = rows_seen(model, lambda: logits.kept_logits(model, ids, attn, keep, pack=True))
        padded = logits.kept_logits(model, ids, attn, keep)
    assert seen == [(3, 12)] and torch.equal(packed, padded)


def test_a_left_padded_batch_is_not_packed():
    model = tiny_model("llama")
    ids, attn, keep = right_padded([6, 3], 128)
    attn, keep = attn.flip(1), keep.flip(1)  # padding on the left
    assert logits._packed_logits(model, ids, attn, keep) is None


@pytest.mark.parametrize("shared", [True, False])
def test_the_loss_on_real_sst2_rows_is_the_padded_one(tokenizer, shared):
    """The claims suite's set-up: the embedded SmolLM2-135M, SST-2 rows, shared prompts or one sequence per
    option; packing changes the loss and the scores only by float rounding, and fills fewer rows."""
    from zobench.models import load_model

    loaded = load_model("smollm2")
    exs = get_task("sst2").sample(None, n_train=16, n_dev=0, n_test=0, seed=0).train
    padded = scoring.encode(exs, loaded.tokenizer, "classification", 128, shared=shared)
    packed = scoring.encode(exs, loaded.tokenizer, "classification", 128, shared=shared, pack=True)
    with torch.no_grad():
        a, _ = rows_seen(loaded.model, lambda: scoring.grouped_scores(loaded.model, padded))
        b, seen = rows_seen(loaded.model, lambda: scoring.grouped_scores(loaded.model, packed))
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), (a - b).abs().max()
        assert float(scoring.loss(loaded.model, packed)) == pytest.approx(float(scoring.loss(loaded.model, padded)),
                                                                          abs=1e-5)
    rows, width = padded["input_ids"].shape
    assert seen[0][0] * seen[0][1] < rows * width / 2  # SST-2 batches are mostly padding


def test_multi_token_options_pack_too(tiny, tokenizer, data_dir):
    """COPA's options are several tokens: one sequence per option, each option token scored, packed; its
    training batches (the correct option as a target, MeZO's LM loss) pack likewise."""
    exs = get_task("copa").sample(str(data_dir), n_train=8, n_dev=0, n_test=0, seed=0).train
    kw = dict(vocab_size=tiny.vocab_size, shared=True, train=False)  # scored per option, as evaluation does
    padded = scoring.encode(exs, tokenizer, "classification", 128, **kw)
    packed = scoring.encode(exs, tokenizer, "classification", 128, pack=True, **kw)
    assert "option_ids" not in packed  # multi-token: per option
    with torch.no_grad():
        a = scoring.grouped_scores(tiny.model, padded)
        b, seen = rows_seen(tiny.model, lambda: scoring.grouped_scores(tiny.model, packed))
    # COPA's sequences are of like length (each over half the longest): as many rows, no padding gained.
    assert seen[0][0] <= padded["input_ids"].shape[0]
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    lm = scoring.encode(exs, tokenizer, "classification", 128, vocab_size=tiny.vocab_size)
    assert "n_options" not in lm
    lm_packed = scoring.encode(exs, tokenizer, "classification", 128, vocab_size=tiny.vocab_size, pack=True)
    with torch.no_grad():
        assert float(scoring.loss(tiny.model, lm_packed)) == pytest.approx(float(scoring.loss(tiny.model, lm)),
                                                                           abs=1e-5)


def test_a_packed_cell_trains_as_the_padded_one_and_says_it_packed(tmp_path):
    """Through a cell: the same losses and test accuracy packed or padded, ``packed`` in the record; a model
    type that cannot pack runs padded with a warning."""
    import json

    from zobench.api import train

    kw = dict(task="sst2", method="random", density=0.01, lr=1e-2, steps=3, warmup_steps=0, n_train=16,
              n_dev=0, n_test=16, batch_size=8, eval_before=False)
    padded = train(model="random:tiny-llama", **kw)
    packed = train(model="random:tiny-llama", pack=True, **kw)
    assert packed.metrics.get("packed") is True and padded.metrics.get("packed") is None
    assert packed.metrics.get("loss_curve") == pytest.approx(padded.metrics.get("loss_curve"), abs=1e-5)
    assert packed.metrics.get("test_after") == padded.metrics.get("test_after")
    opt = tmp_path / "tiny-opt.json"
    opt.write_text(json.dumps({"model_type": "opt", "vocab_size": 128, "hidden_size": 32, "ffn_dim": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
                               "word_embed_proj_dim": 32}))
    rec = train(model=f"random:{opt}", pack=True, **dict(kw, steps=1))
    assert rec.metrics.get("packed") is False and any("opt models are not packed" in w for w in rec.warnings)


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_quantized_dense_and_sparse_layers_pack_too(tiny, name):
    """SensZOQ's set-up: bitsandbytes layers with 0.1% sparse values beside them take packed rows and score
    as padded ones do."""
    pytest.importorskip("bitsandbytes")
    from zobench.quant import QuantContext, get_backend, quantize_model
    from zobench.zo.masks import linear_layers, random_mask, scoped_params

    quantize_model(tiny.model, get_backend(name), QuantContext(), linear_layers(tiny.model),
                   random_mask(scoped_params(tiny.model, "linear"), 0.01, seed=0))
    ids, attn, keep = right_padded([21, 5, 13, 3, 17, 8], 128)
    with torch.no_grad():
        padded = logits.kept_logits(tiny.model, ids, attn, keep)
        packed, seen = rows_seen(tiny.model, lambda: logits.kept_logits(tiny.model, ids, attn, keep, pack=True))
    assert seen[0][0] < 6
    assert torch.allclose(packed, padded, atol=1e-4, rtol=1e-4), (packed - padded).abs().max()
