"""QZO (methods.qzo) on the tiny random Llama: it trains the quantization scales of nf4-plain, fp4-plain, int8
and gptq layers and nothing else, each step bounded by the clipped directional derivative; its runs replay;
its delta round-trips; it learns; and it is refused where a backend has no plain scales."""

from __future__ import annotations

import json

import cue_task
import pytest
import torch
from safetensors.torch import load_file, save_file

from zobench.cell.pipeline import Pipeline
from zobench.errors import UserError
from zobench.methods.qzo import ScaleTrainable
from zobench.models import load_model
from zobench.quant import QuantContext, get_backend, quantize_model
from zobench.spec.catalog import PLAIN_SCALES
from zobench.spec.config import CellConfig
from zobench.zo.masks import linear_layers
from zobench.zo.optim import make_optimizer
from zobench.zo.trainer import ZOTrainer

pytest.importorskip("bitsandbytes")

TINY = dict(model="random:tiny-llama", task="sst2", method="qzo", quant="nf4-plain", n_train=16, n_dev=0, n_test=0,
            batch_size=4, max_length=32, steps=3, warmup_steps=1, eval_before=False, eval_after=False,
            device="cpu", lr=1e-3)


def quantized(**settings) -> Pipeline:
    """A QZO cell's pipeline up to its quantized model (no training yet)."""
    p = Pipeline(CellConfig.from_dict(dict(TINY, **settings)))
    p.check_supported()
    p.sample_data()
    p.load()
    p.quantize()
    return p


def layers_of(backend, model) -> list[str]:
    """The quantized layers whose scales QZO trains (GPTQ's have no weight parameter: the backend finds them)."""
    return backend.scaled_layers(model, linear_layers(model))


def scales(p: Pipeline) -> dict[str, torch.Tensor]:
    model = p.run_state.model
    return {n: p.backend.scales(model.get_submodule(n)).clone() for n in layers_of(p.backend, model)}


def codes(p: Pipeline) -> dict[str, bytes]:
    """The packed 4-bit (or int8) codes of every quantized layer, as bytes (GPTQ: its codes, zero points and
    group index)."""
    model = p.run_state.model

    def raw(t):
        return t.data.contiguous().view(torch.uint8).numpy().tobytes()

    def of(m):
        return raw(m.qweight) + raw(m.qzeros) + raw(m.g_idx) if hasattr(m, "qweight") else raw(m.weight)
    return {n: of(model.get_submodule(n)) for n in layers_of(p.backend, model)}


def needs(quant: str) -> None:
    if quant == "gptq":
        pytest.importorskip("gptqmodel")


def others(p: Pipeline) -> dict[str, torch.Tensor]:
    """Every float parameter outside the quantized layers (embeddings, norms, head)."""
    return {n: t.detach().clone() for n, t in p.run_state.model.named_parameters() if t.is_floating_point()}


@pytest.mark.parametrize("quant", ["nf4-plain", "fp4-plain", "int8", "gptq"])
def test_qzo_moves_every_scale_and_not_one_code_byte(quant):
    needs(quant)
    p = quantized(quant=quant, steps=4)
    codes0, scales0, others0 = codes(p), scales(p), others(p)
    p.train()
    scales1 = scales(p)
    assert codes(p) == codes0
    assert all(torch.equal(t, others0[n]) for n, t in others(p).items())
    assert scales1.keys() == scales0.keys()
    assert all((scales1[n] != scales0[n]).all() for n in scales0), "every scale moves (Rademacher z is never 0)"
    assert p.metrics.get("trainable_numel") == sum(s.numel() for s in scales0.values())


@pytest.mark.parametrize("quant", ["nf4-plain", "fp4-plain", "int8", "gptq"])
def test_the_forward_sees_a_scale_perturbation_of_qzos_size(quant):
    """On a CPU with AVX512-BF16 (bitsandbytes could cast 4-bit scales to bfloat16 there, and 2^-8 of a scale
    would vanish) as anywhere: +eps and -eps on the scales change the loss, each from the unperturbed one."""
    needs(quant)
    p = quantized(quant=quant)
    run = p.run_state
    stepper, trainable = p.method.build_stepper(run)
    batch = run.encode(run.splits.train[:4])

    def loss():
        with torch.inference_mode():
            return float(run.loss_fn(run.model, batch))

    base = loss()
    trainable.apply(7, p.cfg.eps)
    plus = loss()
    trainable.apply(7, -p.cfg.eps)
    minus = loss()
    trainable.restore()
    assert len({base, plus, minus}) == 3
    assert loss() == base  # the restore is exact


@pytest.mark.parametrize("quant", ["nf4-plain", "fp4-plain"])
def test_qzos_estimate_is_the_exact_directional_derivative_of_the_scales(quant):
    """On plain 4-bit scales the forward is a float32 function of them (W = level(code) * s, the scale read as
    stored), so QZO's two-point estimate is the scales' directional derivative to O(eps^2): checked against
    autograd's on a float twin of the model holding the dequantized weights, over several directions."""
    p = quantized(quant=quant)
    run = p.run_state
    _, trainable = p.method.build_stepper(run)
    batch = run.encode(run.splits.train[:8])
    twin = load_model(p.cfg.model).model.eval()  # the same seeded random weights outside the quantized layers
    params = dict(twin.named_parameters())
    for t in twin.parameters():
        t.requires_grad_(False)
    names = layers_of(p.backend, run.model)
    weights, units = [], []
    for name in names:
        m = run.model.get_submodule(name)
        w = p.backend.dequantize(m).float().view(m.out_features, m.in_features)
        s = p.backend.scales(m).float().view(-1, 1)
        units.append(w.view(s.numel(), -1) / s.where(s != 0, torch.ones_like(s)))  # each weight's level
        params[f"{name}.weight"].data = w.clone()
        params[f"{name}.weight"].requires_grad_(True)
        weights.append(params[f"{name}.weight"])
    loss = run.loss_fn(twin, batch)
    with torch.inference_mode():
        assert float(run.loss_fn(run.model, batch)) == pytest.approx(float(loss), rel=1e-5)  # the twin is the model
    loss.backward()
    ds = torch.cat([(w.grad.view(u.shape) * u).sum(1) for w, u in zip(weights, units)]).double()
    exact, estimated = [], []
    for seed in range(1, 9):
        exact.append(float(ds @ trainable.z(seed).double()))
        with torch.inference_mode():
            trainable.apply(seed, p.cfg.eps)
            plus = float(run.loss_fn(run.model, batch))
            trainable.apply(seed, -p.cfg.eps)
            minus = float(run.loss_fn(run.model, batch))
            trainable.restore()
        estimated.append((plus - minus) / (2 * p.cfg.eps))
    scale = max(abs(x) for x in exact)
    assert scale > 0
    for e, g in zip(exact, estimated):
        assert g == pytest.approx(e, abs=0.02 * scale), (exact, estimated)


def test_eps_below_the_resolution_of_the_weights_is_refused():
    from zobench.methods.qzo import check_resolution

    layers = [("a", torch.full((8,), 0.05)), ("b", torch.full((8,), 0.2))]
    check_resolution(layers, 1e-3, torch.float32)
    check_resolution(layers, 1e-3, torch.bfloat16)  # 1e-3 / 0.2 = 0.005: above bfloat16's 2^-8
    with pytest.raises(UserError, match="key 'eps' = 1e-05.*bfloat16") as e:
        check_resolution(layers, 1e-5, torch.bfloat16)
    assert "\n" not in str(e.value)
    # Scales held in float16 (GPTQ's) are the coarser side beside float32 weights: their resolution decides.
    half = [(n, t.half()) for n, t in layers]
    check_resolution(half, 1e-3, torch.float32)  # 1e-3 / 0.2 = 0.005: above float16's 2^-11
    with pytest.raises(UserError, match="key 'eps' = 1e-05.*float16 scales") as e:
        check_resolution(half, 1e-5, torch.float32)
    assert "use dtype float32" not in str(e.value)  # the weights' dtype is not what to change


@pytest.mark.parametrize("quant", PLAIN_SCALES)
def test_the_estimate_prices_exactly_the_scales_qzo_trains(quant):
    """One scale per 64 weights (nf4-plain, fp4-plain), per row (int8), per 128 input columns of a row, a
    shorter last group counting as one (gptq: the tiny model's rows are 64 wide, so one group each)."""
    from zobench.analysis.estimate import estimate_cell

    needs(quant)
    loaded = load_model("random:tiny-llama", seed=0)
    backend = get_backend(quant)
    ctx = QuantContext(tokenizer=loaded.tokenizer, calib_sequences=2, calib_length=32, vocab_size=loaded.vocab_size)
    quantize_model(loaded.model, backend, ctx, linear_layers(loaded.model))
    trained = sum(backend.scales(loaded.model.get_submodule(n)).numel() for n in layers_of(backend, loaded.model))
    cfg = CellConfig.from_dict({"model": "random:tiny-llama", "task": "sst2", "method": "qzo", "quant": quant})
    assert trained > 0 and estimate_cell(cfg)["trainable_numel"] == trained


def test_a_step_moves_each_scale_by_at_most_lr_times_the_threshold_times_z():
    # SGD, q = 1, no weight decay: s <- s - lr * clip(d, -C, C) * z, so |change| <= lr * C * |z| (plus the
    # rounding of the float32 subtraction, at most half an ulp of the new value).
    threshold, lr = 1e-3, 1e-2
    p = quantized(clip_threshold=threshold, lr=lr, direction="gaussian")
    run = p.run_state
    stepper, trainable = p.method.build_stepper(run)
    stream = run.batches()
    clipped = 0
    for i in range(4):
        before = trainable.master.clone()
        res = stepper.step(run.encode(next(stream)), i)
        stepper.flush()
        (seed, coef), = res.directions
        assert abs(coef) <= threshold
        clipped += abs(coef) == threshold
        change = (trainable.master - before).abs()
        bound = lr * threshold * trainable.z(seed).abs()
        assert (change <= bound + torch.finfo(torch.float32).eps * trainable.master.abs()).all()
        assert change.max() > 0
    assert clipped, "the tiny threshold clipped no step: the bound was not tested"


@pytest.mark.parametrize("fold", [False, True], ids=["update", "update-folded-into-the-next-perturbation"])
def test_an_update_that_would_take_a_scale_below_zero_stops_it_at_zero(fold):
    """QZO's update is projected onto non-negative scales (the paper's s <- max(s - lr d z, 0)): a scale of
    1e-3 that a step of 0.1 takes down is 0, one it takes up is 0.101, the large ones move by 0.1 either way;
    folded into the next perturbation, the perturbed live scales start from the projected ones."""
    start = torch.tensor([1e-3] * 32 + [1.0] * 32)
    live = start.clone()
    trainable = ScaleTrainable([("layer", live)])
    z = trainable.z(5)
    if fold:
        trainable.fold_step([(5, 1.0)], make_optimizer("sgd", 0.1), 0, 9, 1e-3)
    else:
        trainable.update([(5, 1.0)], make_optimizer("sgd", 0.1), 0)
    expected = (start - 0.1 * z).clamp(min=0)
    assert bool((z[:32] > 0).any()) and bool((z[:32] < 0).any())  # both directions are tried
    assert torch.allclose(trainable.master, expected, rtol=0, atol=1e-7)
    assert bool((trainable.master[:32][z[:32] > 0] == 0).all())
    assert torch.allclose(live, expected + (1e-3 * trainable.z(9) if fold else 0), rtol=0, atol=1e-7)


def test_same_seed_same_scales_and_another_seed_other_scales():
    def trained(seed):
        p = quantized(seed=seed, steps=3)
        p.train()
        return scales(p)

    a, b, c = trained(0), trained(0), trained(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("quant", ["nf4-plain", "gptq"])
def test_the_trained_scales_are_saved_and_loaded_with_delta(tmp_path, quant):
    """GPTQ's scales are float16 in the layer: the delta keeps the float32 master, and loading it writes
    back exactly what the trained layer held."""
    needs(quant)
    trained = Pipeline(CellConfig.from_dict(dict(TINY, quant=quant, save=str(tmp_path / "d"))))
    rec = trained.run()
    assert rec.artifact["kind"] == "scales" and rec.artifact["step"] == 3
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    kept = load_file(str(tmp_path / "d" / "delta.safetensors"))
    # the scales only: no codes, no weights
    assert set(kept) == set(layers_of(trained.backend, trained.run_state.model)) and kept
    want = scales(trained)
    again = reload(tmp_path / "d", meta)
    got = scales(again)
    assert all(torch.equal(got[n], want[n]) for n in want)
    base = quantized(quant=quant, steps=0)
    assert all(not torch.equal(scales(base)[n], want[n]) for n in want)


def reload(delta, meta, **settings) -> Pipeline:
    """What `zobench eval --delta` runs: no steps, on the delta's own settings."""
    cfg = {k: v for k, v in meta["config"].items() if k not in ("save", "delta")}
    cfg.update(steps=0, warmup_steps=0, eval_after=False, delta=str(delta), **settings)
    p = Pipeline(CellConfig.from_dict(cfg))
    p.run()
    return p


def test_a_tampered_or_misplaced_scales_delta_is_refused_in_one_line(tmp_path):
    Pipeline(CellConfig.from_dict(dict(TINY, steps=1, warmup_steps=0, save=str(tmp_path / "d")))).run()
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    file = tmp_path / "d" / "delta.safetensors"
    good = load_file(str(file))
    name = sorted(good)[0]

    def refused(tensors, match, **settings):
        save_file(tensors, str(file))
        with pytest.raises(UserError, match=match) as e:
            reload(tmp_path / "d", meta, **settings)
        assert "\n" not in str(e.value)

    refused({**good, name: torch.full_like(good[name], float("nan"))}, "not finite")
    past = good[name].double().clone()
    past[0] = 1e300  # finite in float64, infinite in the layer's float32
    refused({**good, name: past}, "not finite in the layer's torch.float32")
    negative = good[name].clone()
    negative[0] = -abs(float(negative[0])) - 1
    refused({**good, name: negative}, "negative scales")
    refused({**good, name: good[name][:-1]}, "has shape")
    refused({**good, "model.embed_tokens": good[name].clone()}, "no plain quantization scales")
    refused(good, "quantization scales of nf4-plain weights; load it with quant 'nf4-plain'", quant="int8")
    refused(good, "trained from another base model", seed=1)
    save_file(good, str(file))
    (tmp_path / "d" / "delta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "scales_base"}))
    with pytest.raises(UserError, match="scales_base"):
        reload(tmp_path / "d", meta)


@pytest.mark.parametrize("quant", ["nf4-plain", "fp4-plain", "int8", "gptq"])
def test_qzo_learns_a_tiny_task_on_a_tiny_random_llama(quant):
    """QZO trains the scales of a tiny random Llama's quantized layers on the cue task (tests/cue_task.py), with
    the config's default clip threshold: held-out accuracy must end at least 10 points above the majority
    rate (52%). Measured here after 60 steps: nf4-plain 45.5% -> 92.5%, int8 46.5% -> 88.5%; gptq 48.8% -> 88.2%
    at lr 1e-4, since its scales multiply integer codes (q - zero, |.| up to 8) where bitsandbytes' multiply
    codes normalised to [-1, 1] (at 1e-3 it reached 72%, at 1e-2 it stayed at 48%)."""
    needs(quant)
    loaded = load_model("random:tiny-llama", seed=0)
    model, backend = loaded.model, get_backend(quant)
    ctx = QuantContext(tokenizer=loaded.tokenizer, calib_sequences=4, calib_length=64, vocab_size=loaded.vocab_size)
    quantize_model(model, backend, ctx, linear_layers(model))
    model.eval()
    trainable = ScaleTrainable([(n, backend.scales(model.get_submodule(n))) for n in layers_of(backend, model)])
    clip = CellConfig.from_dict({"method": "qzo", "quant": quant}).clip_threshold
    lr = 1e-4 if quant == "gptq" else 1e-2
    trainer = ZOTrainer(model, trainable, make_optimizer("sgd", lr), cue_task.loss, 1e-3, seed=0, clip=clip)
    train, test = cue_task.examples(512, 1), cue_task.examples(400, 2)
    before, after = cue_task.train_and_score(trainer, train, test, steps=60)
    majority = cue_task.majority(test)
    assert before < majority + cue_task.MARGIN, (before, majority)  # a task it had to learn
    assert after >= majority + cue_task.MARGIN, (before, after, majority)


def test_qzo_is_refused_without_plain_scales_naming_the_key():
    for quant in ("none", "nf4", "hqq"):
        with pytest.raises(UserError,
                           match=r"s\.yaml: key 'quant' = '.*': expected one of nf4-plain, fp4-plain, int8, gptq"):
            CellConfig.from_dict({"method": "qzo", "quant": quant}, "s.yaml")
    with pytest.raises(UserError, match="key 'scope'"):
        CellConfig.from_dict({"method": "qzo", "quant": "int8", "scope": "all"}, "s.yaml")
    with pytest.raises(UserError, match="key 'clip_threshold'"):
        CellConfig.from_dict({"method": "qzo", "quant": "int8", "clip_threshold": 0}, "s.yaml")


@pytest.mark.slow  # a process per cell; the quick smoke path of every method is tests/test_methods.py's
def test_a_qzo_suite_runs_end_to_end(tmp_path):
    from zobench.analysis.estimate import estimate_cell
    from zobench.driver import run_suite
    from zobench.executors.pool import PoolExecutor
    from zobench.results import load_records
    from zobench.spec.suite import parse_suite

    defaults = {k: v for k, v in TINY.items() if k not in ("method", "quant", "device")}
    suite = parse_suite({"name": "qzo", "defaults": defaults,
                         "matrix": {"method": ["qzo"], "quant": ["nf4-plain", "int8"]}}, "qzo.yaml")
    records = load_records(run_suite(suite, tmp_path, executor=PoolExecutor(jobs=2)))
    qzo = [r for r in records if r.method == "qzo"]
    assert len(qzo) == 2 and len(records) == 4  # and a forward reference per quant
    for rec in qzo:
        assert rec.ok, rec.reason
        assert len(rec.metrics.get("loss_curve")) == 3 and len(rec.metrics.get("trajectory")) == 3
        # the estimator prices exactly the scales the run trained (one per 64 weights, or per int8 row)
        assert estimate_cell(CellConfig.from_dict(rec.config))["trainable_numel"] == rec.metrics.get("trainable_numel")
