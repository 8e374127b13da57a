"""quzo: stochastic rounding onto the int8 and NF4 grids, the codes as the trained state (scales untouched,
exact restores, replayable trajectories), its codes delta, its refusals, and a cell through the pipeline."""

from __future__ import annotations

import contextlib
import math

import cue_task
import pytest
import torch
from safetensors.torch import load_file, save_file

from zobench.analysis.architecture import architecture
from zobench.analysis.estimate import estimate_cell
from zobench.cell.pipeline import Pipeline
from zobench.driver import run_suite
from zobench.errors import UserError
from zobench.gates import bnb
from zobench.methods import quzo
from zobench.methods.quzo import SKIPPED_PER_ROW, CodeTrainable
from zobench.models import load_model
from zobench.quant import QuantContext, get_backend, quantize_model
from zobench.quant.codes import INT8_MAX, code_layers, decode, row_scales
from zobench.results import load_records
from zobench.spec.config import CellConfig
from zobench.spec.suite import parse_suite
from zobench.zo import fused
from zobench.zo.bits import get_bits, put_bits
from zobench.zo.drift import measure_restore_drift
from zobench.zo.kernels import build
from zobench.zo.masks import linear_layers
from zobench.zo.optim import ZOSGD
from zobench.zo.rounding import round_offset, round_to_levels, uniform
from zobench.zo.trainer import ZOTrainer, replay

pytest.importorskip("bitsandbytes")

# Two-sided z-test at alpha = 1e-6: |z| > 4.8916 happens by chance once in a million tests of an unbiased
# rounding. The noise is Philox with fixed seeds, so each test draws the same numbers in every run: the stated
# rate is that of a fresh seed, and in CI the outcome is fixed.
Z_CRIT = 4.8916
DRAWS = 200_000


@pytest.fixture(autouse=True)
def one_thread():
    """The passes here run on a few thousand values: one thread, or a shared machine's team wait dominates."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _z_score(rounded: torch.Tensor, x: float, lo: float, hi: float) -> float:
    """The mean of ``rounded`` (values on lo / hi) against x, in standard errors of an unbiased rounding."""
    sd = math.sqrt((x - lo) * (hi - x) / rounded.numel())
    return (float(rounded.double().mean()) - x) / sd


@pytest.mark.parametrize("x", [0.3, -2.71, 0.001, 126.5])
def test_stochastic_rounding_is_unbiased_on_the_uniform_int8_grid(x):
    noise = uniform(12345, 0, DRAWS, "cpu")
    rounded = round_offset(torch.full((DRAWS,), x, dtype=torch.float64), noise)
    lo = math.floor(x)
    assert set(rounded.unique().tolist()) <= {lo, lo + 1}
    assert abs(_z_score(rounded, x, lo, lo + 1)) < Z_CRIT
    nearest = round_offset(torch.full((4,), x, dtype=torch.float64), None)  # the biased rule, for contrast
    assert nearest.tolist() == [round(x + 1e-12) if x - lo != 0.5 else lo + 1] * 4


@pytest.mark.parametrize("between", [(0, 0.5), (6, 0.01), (7, 0.9), (14, 0.37)])
def test_stochastic_rounding_is_unbiased_on_the_nf4_grid(between):
    levels = bnb.functional().get_4bit_type("nf4", device="cpu").double().sort().values
    k, frac = between
    lo, hi = float(levels[k]), float(levels[k + 1])
    x = lo + frac * (hi - lo)
    idx = round_to_levels(torch.full((DRAWS,), x, dtype=torch.float64), levels, uniform(777, 5, DRAWS, "cpu"))
    assert set(idx.unique().tolist()) <= {k, k + 1}
    assert abs(_z_score(levels[idx], x, lo, hi)) < Z_CRIT


def test_values_on_the_grid_round_to_themselves():
    noise = uniform(3, 0, 255, "cpu")
    ints = torch.arange(-127, 128, dtype=torch.float64)
    assert torch.equal(round_offset(ints, noise), ints.long())
    for kind in ("nf4", "fp4"):
        levels = bnb.functional().get_4bit_type(kind, device="cpu").double().unique()
        assert torch.equal(round_to_levels(levels, levels, noise[:levels.numel()]), torch.arange(levels.numel()))


# -- the codes as the trained state ---------------------------------------------------------------------

def _quantized(quant: str):
    loaded = load_model("random:tiny-llama", dtype="float32", seed=0)
    quantize_model(loaded.model, get_backend(quant), QuantContext(), linear_layers(loaded.model))
    return loaded.model


def _trainer(model, seed=0, lr=1e-2, rounding="stochastic"):
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    trainable = CodeTrainable(code_layers(model), rounding=rounding)
    loss = lambda m, batch: m(batch, labels=batch).loss  # noqa: E731
    return ZOTrainer(model, trainable, ZOSGD(lr), loss, eps=1e-3, seed=seed), ids


@pytest.mark.parametrize("quant", ["int8", "nf4", "nf4-plain", "fp4-plain"])
def test_steps_change_codes_never_scales_and_restores_are_exact(quant):
    model = _quantized(quant)
    trainer, ids = _trainer(model)
    layers = code_layers(model)
    scales = [layer.scales_snapshot() for layer in layers]
    codes = [p.clone() for p in trainer.trainable.params]
    assert measure_restore_drift(trainer.trainable, 1e-3)["restore_drift_frac_changed"] == 0.0
    trainer.trainable.apply(7, 1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(codes, trainer.trainable.params))  # the forwards see a move
    if quant == "int8":  # what the price holds between a perturbation and its restore
        skipped = sum(s.numel() for s in trainer.trainable.skipped)
        assert 0 < skipped <= SKIPPED_PER_ROW * sum(layer.shape[0] for layer in layers)
    trainer.trainable.restore()
    assert all(torch.equal(a, b) for a, b in zip(codes, trainer.trainable.params))
    for i in range(4):
        trainer.step(ids, i)
    trainer.flush()
    assert all(torch.equal(s, layer.scales_snapshot()) for s, layer in zip(scales, layers))
    moved = sum(int((a != b).sum()) for a, b in zip(codes, trainer.trainable.params))
    assert moved > 0
    lo, hi = layers[0].code_range
    assert all(lo <= int(layer.read(0, layer.numel).min()) and int(layer.read(0, layer.numel).max()) <= hi
               for layer in layers)


@pytest.mark.parametrize("quant, direction", [("nf4", "rademacher"), ("fp4", "gaussian"),
                                              ("nf4-plain", "gaussian")])
def test_a_4bit_perturbation_moves_a_code_one_level_at_most_and_its_bits_take_it_back(quant, direction):
    """What lets a 4-bit restore run from one bit a value instead of a copy of the codes: every value moves
    at most one level, in the direction of eps z, its bit set exactly where it moved; a code that is not its
    level's own (FP4's -0) never moves; the restore gives every code back, also at an eps large enough that
    most targets lie past the next level (those values move to it, their perturbation clipped)."""
    trainable = CodeTrainable(code_layers(_quantized(quant)), direction)
    before = [layer.read(0, layer.numel) for layer in trainable.layers]
    assert [m.numel() for m in trainable.moved] == [(layer.numel + 7) // 8 for layer in trainable.layers]
    odd = [code_of[rank[b]] != b for b, (_, rank, code_of) in zip(before, trainable.grids)]
    assert (sum(int(o.sum()) for o in odd) > 0) == (quant == "fp4")  # FP4's -0 codes are there to test
    counts = []
    for seed, eps in ((21, 1e-3), (22, 3e-2), (22, -3e-2)):
        trainable.apply(seed, eps)
        moved = 0
        for k, layer in enumerate(trainable.layers):
            _, rank, _ = trainable.grids[k]
            now = layer.read(0, layer.numel)
            changed = now != before[k]
            assert torch.equal(changed, get_bits(trainable.moved[k], 0, layer.numel))
            step = rank[now] - rank[before[k]]
            way = torch.sign(trainable._z(seed, trainable.offsets[k], layer.numel, now.device) * eps).long()
            assert torch.equal(step[changed], way[changed])  # one level, the way of eps z
            assert not changed[odd[k]].any()
            moved += int(changed.sum())
        counts.append(moved)
        trainable.restore()
        assert all(torch.equal(layer.read(0, layer.numel), b) for layer, b in zip(trainable.layers, before))
    total = sum(layer.numel for layer in trainable.layers)
    assert 0 < counts[0] < counts[1] and counts[1] > total / 2  # a large eps moves most values (clipped)


def test_an_int8_perturbation_moves_a_code_with_probability_eps_over_its_rows_step():
    """What ``perturb_frac_changed`` reports for QuZO: with eps below every row's step (absmax / 127), a value
    moves one level with probability eps / step, the codes at +-127 never (the edge, left unperturbed). The
    observed share over the tiny Llama's codes (73,728) must lie within 5 standard errors of that expectation
    (a false alarm once in ~1.7 million fresh seeds)."""
    layers = code_layers(_quantized("int8"))
    steps = [row_scales(layer.module).float() / INT8_MAX for layer in layers]
    eps = 0.5 * float(min(s.min() for s in steps))
    p = torch.cat([torch.where(layer.read(0, layer.numel).view(layer.shape).abs() < INT8_MAX,
                               (eps / s).unsqueeze(1), torch.zeros(())).view(-1) for layer, s in zip(layers, steps)])
    observed = measure_restore_drift(CodeTrainable(layers), eps)["perturb_frac_changed"]
    se = float((p * (1 - p)).sum().sqrt()) / p.numel()
    assert 0.05 < float(p.mean()) < 0.95  # a share the test can tell from 0 and 1
    assert abs(observed - float(p.mean())) < 5 * se, (observed, float(p.mean()), se)


@pytest.mark.parametrize("quant", ["int8", "fp4"])
def test_a_zero_update_leaves_every_code_alone(quant):
    model = _quantized(quant)
    trainer, _ = _trainer(model)
    codes = [p.clone() for p in trainer.trainable.params]
    trainer.trainable.update([(5, 0.0)], ZOSGD(1e-2), 0)
    assert all(torch.equal(a, b) for a, b in zip(codes, trainer.trainable.params))


def test_the_trajectory_replays_from_its_seeds():
    runs = []
    for _ in range(2):
        trainer, ids = _trainer(_quantized("int8"), seed=3)
        trajectory = [trainer.step(ids, i).directions for i in range(3)]
        trainer.flush()
        runs.append((trajectory, [p.clone() for p in trainer.trainable.params]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    fresh, _ = _trainer(_quantized("int8"))
    replay(fresh.trainable, fresh.optimizer, runs[0][0], 1e-3, 3)  # no forward: the seeds alone
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], fresh.trainable.params))


def _moves(quant, direction, rounding, odd_rows=False):
    """The codes after each of a sequence of passes (perturbations of both signs, a restore, an update with
    two directions and weight decay, an update straight after a perturbation), and the C passes that ran.
    ``odd_rows``: int8 rows whose scale is 0 (no step at all) or tiny (a perturbation of ~10^26 steps)."""
    model = _quantized(quant)
    if odd_rows:
        for layer in code_layers(model):
            scb = row_scales(layer.module)
            scb[::7] = 0.0
            scb[3::7] = 1e-30
    trainable = CodeTrainable(code_layers(model), direction, rounding)
    fused.pass_stats(reset=True)
    seen = []
    eps = 3e-2 if quant != "int8" else 3e-3  # int8: a few steps; codes near the range's edge left alone
    for seed, scale in ((11, eps), (11, -eps), (12, eps / 3)):
        trainable.apply(seed, scale)
        seen.append([p.clone() for p in trainable.params])
    trainable.restore()
    seen.append([p.clone() for p in trainable.params])
    trainable.update([(11, 0.7), (12, -1.3)], ZOSGD(5e-2, weight_decay=0.1), 0)
    seen.append([p.clone() for p in trainable.params])
    trainable.apply(13, -eps)  # an update straight after a perturbation restores it in its own pass
    trainable.update([(13, 0.9)], ZOSGD(5e-2), 1)
    seen.append([p.clone() for p in trainable.params])
    # the trainer's fold: a step's update and the next step's +eps in one pass (the pending -eps restored first)
    trainable.apply(14, eps)
    trainable.apply(14, -eps)
    trainable.fold_step([(14, -0.8)], ZOSGD(5e-2), 2, 15, eps)
    seen.append([p.clone() for p in trainable.params])
    trainable.restore()  # the folded perturbation comes back off exactly (its bits and kept positions)
    seen.append([p.clone() for p in trainable.params])
    return seen, fused.pass_stats(reset=True)["calls"].get(fused.C_PATH, 0)


@pytest.mark.parametrize("quant", ["nf4-plain", "int8"])
def test_the_c_passes_built_without_march_native_move_codes_alike(quant, tmp_path, monkeypatch):
    """The C library's vector code (AVX-512 permutes of the 4-bit tables, int8's vectorised loops) and the
    plain loops a build for any x86-64 runs give the same codes."""
    native, _ = _moves(quant, "rademacher", "stochastic")
    generic = fused.bind(build.load(tmp_path, tuple(f for f in build.FLAGS if f != "-march=native")))
    monkeypatch.setitem(fused._state, "lib", generic)
    plain, calls = _moves(quant, "rademacher", "stochastic")
    assert calls > 0
    for i, (a, b) in enumerate(zip(native, plain)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), i


@pytest.mark.parametrize("quant, direction, rounding", [("nf4", "rademacher", "stochastic"),
                                                        ("nf4-plain", "gaussian", "stochastic"),
                                                        ("fp4", "rademacher", "nearest"),
                                                        ("int8", "rademacher", "stochastic"),
                                                        ("int8", "rademacher", "nearest"),
                                                        ("int8", "gaussian", "nearest")])
def test_the_c_pass_moves_codes_as_the_torch_path_does(quant, direction, rounding):
    """A layer's perturbation (both signs, one after the other), its restore and the update (two directions,
    weight decay; and straight after a perturbation) on the C library give the torch path's codes bit for bit:
    a run replays on any device."""
    ways = []
    for forced in (False, True):
        with fused.torch_fallback() if forced else contextlib.nullcontext():
            ways.append(_moves(quant, direction, rounding))
    (c_way, c_calls), (torch_way, _) = ways
    assert c_calls > 0  # the C pass did run (else the comparison is the torch path with itself)
    for i, (a, b) in enumerate(zip(c_way, torch_way)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), i
    assert any(not torch.equal(x, y) for x, y in zip(c_way[0], c_way[3]))  # the perturbation moved codes
    assert any(not torch.equal(x, y) for x, y in zip(c_way[3], c_way[4]))  # so did the update


def test_int8_layers_cut_into_runs_across_c_calls_move_codes_as_the_torch_path_does(monkeypatch):
    """The C library takes several int8 layers a call, up to ``C_VALUES`` values, a larger layer cut into runs:
    with runs of 2,999 values (each starting inside a byte of the layer's bits and inside a tile, the kept
    positions of a pending perturbation split among them) the codes are the torch path's, as with whole layers."""
    if fused.path() != fused.C_PATH:
        pytest.skip("the C library is not built here")
    with fused.torch_fallback():
        expected, _ = _moves("int8", "rademacher", "stochastic")
    whole, whole_calls = _moves("int8", "rademacher", "stochastic")
    monkeypatch.setattr(quzo, "C_VALUES", 2999)
    cut, cut_calls = _moves("int8", "rademacher", "stochastic")
    assert 0 < whole_calls < cut_calls  # the runs did go to more calls
    assert max(layer.numel for layer in code_layers(_quantized("int8"))) > 2999
    for i, (a, b, c) in enumerate(zip(expected, whole, cut)):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c)), i


@pytest.mark.parametrize("quant, eps", [("nf4-plain", 3e-2), ("int8", 3e-3)])
def test_a_folded_step_is_one_c_pass_a_layer_with_the_codes_of_an_update_and_a_perturbation(quant, eps):
    """``fold_step`` on the C library perturbs each tile straight after its update: half the calls (one pass
    over each layer's memory) of an update followed by ``apply``, and the same codes, bits and kept positions."""
    if fused.path() != fused.C_PATH:
        pytest.skip("the C library is not built here")
    ways = [CodeTrainable(code_layers(_quantized(quant))) for _ in range(2)]
    for trainable in ways:
        trainable.apply(3, eps)
        trainable.apply(3, -eps)
    fused.pass_stats(reset=True)
    ways[0].fold_step([(3, 0.6)], ZOSGD(5e-2), 0, 4, eps)
    folded = fused.pass_stats(reset=True)["calls"][fused.C_PATH]
    ways[1].update([(3, 0.6)], ZOSGD(5e-2), 0)
    ways[1].apply(4, eps)
    assert 2 * folded == fused.pass_stats(reset=True)["calls"][fused.C_PATH]
    a, b = ways
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))
    bits = (a.moved, b.moved) if quant != "int8" else (a.ups, b.ups)
    assert all(torch.equal(x, y) for x, y in zip(*bits))
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a.skipped, b.skipped))
    assert (a._seed, a._scale) == (b._seed, b._scale) == (4, eps)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_the_c_int8_pass_moves_rows_of_zero_and_tiny_scale_as_the_torch_path_does(rounding):
    """Rows whose step is 0 (nothing moves) or ~10^-32 (every perturbation leaves the range: the code is
    kept, an update clamps it) give the torch path's codes on the C library's int32 lanes too."""
    ways = []
    for forced in (False, True):
        with fused.torch_fallback() if forced else contextlib.nullcontext():
            ways.append(_moves("int8", "rademacher", rounding, odd_rows=True))
    (c_way, c_calls), (torch_way, _) = ways
    assert c_calls > 0
    for i, (a, b) in enumerate(zip(c_way, torch_way)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), i
    # the update (lr 5e-2 along 0.7 z(11) - 1.3 z(12)) takes a tiny-scale row's codes to the edge its move
    # points to (before the clamp to +-2^20 steps, a move past int64's range wrapped round and went either way)
    first = code_layers(_quantized("int8"))[0]
    cols = first.shape[1]
    z = [fused.fill_z(torch.empty(cols), 3 * cols, "rademacher", seed).double() for seed in (11, 12)]
    toward = torch.where(0.7 * z[0] - 1.3 * z[1] < 0, INT8_MAX, -INT8_MAX).to(torch.int8)
    assert torch.equal(c_way[4][0].view(first.shape)[3], toward)
    assert torch.equal(c_way[4][0].view(first.shape)[0], first.read(0, cols).to(torch.int8))  # scale 0: still


def test_uniform_noise_is_the_same_from_c_and_torch_and_strictly_inside_0_1():
    c = uniform(2**61 + 5, 1001, 70_001, "cpu")
    with fused.torch_fallback():
        t = uniform(2**61 + 5, 1001, 70_001, "cpu")
    assert torch.equal(c, t)
    assert 0 < float(c.min()) and float(c.max()) < 1
    assert torch.equal(uniform(2**61 + 5, 1003, 5, "cpu"), c[2:7])  # value i depends on i alone


def _noise_parts(seed: int, i: int) -> tuple[int, float]:
    """(h, v) of value i's rounding noise U = (h + v) / 2^16 (``zo.rounding.uniform``)."""
    u = float(uniform(seed, i, 1, "cpu")[0]) * 65536
    return math.floor(u), u - math.floor(u)


def _tie_index(direction_seed: int, noise_seed: int, offset: int, n: int, start: int = 17) -> int:
    """A value at or after ``start`` (inside a vector loop's body) whose z is +1 and whose noise's fine part
    v lies well inside (0, 1), so that a fraction can be put just either side of it."""
    z = fused.fill_z(torch.empty(n), offset, "rademacher", direction_seed)
    for i in range(start, n):
        if z[i] > 0 and 1e-3 < _noise_parts(noise_seed, offset + i)[1] < 1 - 1e-3:
            return i
    raise AssertionError("no such value")


@pytest.mark.parametrize("side", [-1, 1])
@pytest.mark.parametrize("antithetic", [False, True])
def test_an_int8_rounding_tie_in_the_noises_16_bits_is_settled_by_its_fine_part(side, antithetic):
    """The C passes compare the noise's 16 bits h with T = floor(2^16 f) and draw its fine part v only where
    h == T (one value in 65536). A row's fraction placed just below or above one value's own noise makes a
    tie there, and that value rounds down or up; every value of the row rounds as the torch path's
    ``round_offset`` does (1 - U where antithetic)."""
    n, offset = 256, 1000
    codes = torch.zeros(n, dtype=torch.int8)
    if not fused.c_ready(codes):
        pytest.skip("the C library is not built here")
    i0 = _tie_index(4, 11, offset, n)
    h, v = _noise_parts(11, offset + i0)
    if antithetic:
        h, v = 65535 - h, 1 - v
    eps = 2 + (h + v + side * 1e-4) / 65536  # steps of 1.0 (SCB 127): value i0's fraction puts it at a tie
    assert math.floor((eps - 2) * 65536) == h
    ups = torch.zeros((n + offset % 8 + 7) // 8, dtype=torch.uint8)
    fused.c_int8(codes, 0, n, n, offset, torch.tensor([127.0]), "rademacher", [(4, eps)], "perturb", ups,
                 noise_seed=11, antithetic=antithetic)
    assert int(codes[i0]) == (3 if side > 0 else 2)
    z = fused.fill_z(torch.empty(n), offset, "rademacher", 4).double()
    noise = uniform(11, offset, n, "cpu")
    assert torch.equal(codes.long(), round_offset(z * eps, 1 - noise if antithetic else noise))


@pytest.mark.parametrize("side", [-1, 1])
def test_a_4bit_rounding_tie_in_the_noises_16_bits_is_settled_by_its_fine_part(side):
    """The 4-bit pass's registers (8 values a vector) at a tie: a value on level 5 of a uniform 16-level grid,
    its fraction towards level 6 just below or above its own noise, stays or moves up."""
    if fused.path() != fused.C_PATH:
        pytest.skip("the C library is not built here")
    n, offset = 256, 8 * 37
    packed = torch.full((n // 2,), 0x55, dtype=torch.uint8)  # every value on code 5
    levels = torch.linspace(-1, 1, 16, dtype=torch.float64)
    i0 = _tie_index(4, 11, offset, n)
    h, v = _noise_parts(11, offset + i0)
    lo, gap = float(levels[5]), float(levels[6] - levels[5])
    eps = (h + v + side * 1e-4) / 65536 * gap  # absmax 1: the target is level 5 + eps
    frac = ((lo + eps) - lo) / gap  # the pass's fraction, by its operations
    assert math.floor(frac * 65536) == h and (v < frac * 65536 - h) == (side > 0)
    bits = torch.zeros(n // 8, dtype=torch.uint8)
    assert fused.c_grid4(packed, n, offset, torch.ones(n // 64), 64, (levels, torch.arange(16), torch.arange(16)),
                         "rademacher", [(4, eps)], "perturb", bits, noise_seed=11)
    code = int(packed[i0 // 2] >> 4 if i0 % 2 == 0 else packed[i0 // 2] & 15)
    assert code == (6 if side > 0 else 5)


def _regression(quant: str):
    """One quantized 16x16 layer regressed onto a teacher 0.3 * N(0, 1) away: a loss ZO moves in few steps."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 16, bias=False)
    teacher = linear.weight.detach() + 0.3 * torch.randn(16, 16)
    model = torch.nn.Sequential(get_backend(quant).quantize_linear(linear, QuantContext()))
    x = torch.randn(64, 16)
    return model, (x, x @ teacher.T)


@pytest.mark.parametrize("quant, lr, eps, steps, bound", [("int8", 1e-2, 1e-3, 60, 0.90),
                                                          ("nf4", 3e-3, 1e-2, 200, 0.97)])
def test_quzo_learns_a_tiny_regression(quant, lr, eps, steps, bound):
    """Measured here: int8 1.877 -> 1.604 in 60 steps, nf4 1.868 -> 1.726 in 200 (its levels are ~10x
    coarser, so a rounding's variance is larger against the same drift); lr 0 leaves the loss unchanged."""
    model, batch = _regression(quant)
    loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]).float(), b[1])  # noqa: E731
    with torch.inference_mode():
        before = float(loss(model, batch))
    trainer = ZOTrainer(model, CodeTrainable(code_layers(model)), ZOSGD(lr), loss, eps=eps, seed=0)
    for i in range(steps):
        trainer.step(batch, i)
    trainer.flush()
    with torch.inference_mode():
        after = float(loss(model, batch))
    assert after < bound * before, (before, after)


@pytest.mark.parametrize("quant, eps, steps", [("int8", 1e-3, 60), ("nf4-plain", 1e-2, 100)])
def test_quzo_learns_a_tiny_task_on_a_tiny_random_llama(quant, eps, steps):
    """QuZO moves the codes of a tiny random Llama's quantized layers on the cue task (tests/cue_task.py): held-out
    accuracy must end at least 10 points above the majority rate (52%). NF4's eps is 10x int8's: its levels are
    ~10x coarser, so a smaller perturbation mostly rounds back to the code it started from. Measured here at lr
    1e-3: int8 46.5% -> 92% in 60 steps; nf4-plain 45.5% -> 94% in 100 (65% at step 40, so a slower climb; at
    lr 3e-3 it swings between 54% and 90%)."""
    model = load_model("random:tiny-llama", seed=0).model
    quantize_model(model, get_backend(quant), QuantContext(), linear_layers(model))
    model.eval()
    trainer = ZOTrainer(model, CodeTrainable(code_layers(model)), ZOSGD(1e-3), cue_task.loss, eps=eps, seed=0)
    train, test = cue_task.examples(512, 1), cue_task.examples(400, 2)
    before, after = cue_task.train_and_score(trainer, train, test, steps=steps)
    majority = cue_task.majority(test)
    assert before < majority + cue_task.MARGIN, (before, majority)  # a task it had to learn
    assert after >= majority + cue_task.MARGIN, (before, after, majority)


# -- refusals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, key", [({}, "quant"), ({"quant": "gptq"}, "quant"), ({"quant": "hqq"}, "quant"),
                                           ({"quant": "int8", "optimizer": "adam"}, "optimizer"),
                                           ({"quant": "nf4", "scope": "all"}, "scope"),
                                           ({"quant": "nf4", "rounding": "up"}, "rounding")])
def test_quzo_is_refused_at_validation_where_it_does_not_apply(settings, key):
    with pytest.raises(UserError, match=f"s.yaml: key '{key}'") as e:
        CellConfig.from_dict({"method": "quzo", **settings}, where="s.yaml")
    assert "\n" not in str(e.value)
    CellConfig.from_dict({"method": "quzo", "quant": "fp4", "rounding": "nearest"}, where="s.yaml")


def test_price_holds_a_bit_per_code_and_the_int8_edge_positions():
    est = {q: estimate_cell(CellConfig.from_dict({"model": "random:tiny-llama", "method": "quzo", "quant": q,
                                                  "device": "cpu"}))
           for q in ("int8", "nf4")}
    numel = est["nf4"]["linear_numel"]  # the tiny model's block linears: all of them trained
    held = {q: e["breakdown"]["trainable_mib"] * 2**20 for q, e in est.items()}
    assert held["nf4"] == pytest.approx(numel / 8, abs=2**20 / 1000)  # a bit a code: where it moved
    assert held["nf4"] < held["int8"] < numel  # a bit a code (how it rounded) and a few edge positions a row: no copy
    assert est["int8"]["trainable_numel"] == est["nf4"]["trainable_numel"] == numel


# -- the artifact and the pipeline ------------------------------------------------------------------------

TINY = {"model": "random:tiny-llama", "task": "sst2", "n_train": 8, "n_dev": 0, "n_test": 0, "batch_size": 4,
        "max_length": 32, "steps": 3, "warmup_steps": 1, "eval_before": False, "eval_after": False, "lr": 1e-2,
        "method": "quzo", "device": "cpu"}


def _codes(model) -> list[torch.Tensor]:
    return [layer.codes.clone() for layer in code_layers(model)]


def _run(**settings):
    pipeline = Pipeline(CellConfig.from_dict({**TINY, **settings}))
    return pipeline, pipeline.run()


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_the_codes_delta_round_trips_through_save_and_delta_load(quant, tmp_path):
    trained, rec = _run(quant=quant, save=str(tmp_path / "d"))
    assert rec.artifact["kind"] == "codes"
    codes = _codes(trained.run_state.model)
    base, _ = _run(quant=quant, steps=0)
    loaded, rec = _run(quant=quant, steps=0, delta=str(tmp_path / "d"))
    assert rec.metrics.get("delta")["kind"] == "codes"
    assert all(torch.equal(a, b) for a, b in zip(codes, _codes(loaded.run_state.model)))
    changed = sum(int((a != b).sum()) for a, b in zip(codes, _codes(base.run_state.model)))
    assert changed > 0


    stored = load_file(str(tmp_path / "d" / "delta.safetensors"))
    positions = sum(t.numel() for k, t in stored.items() if k.endswith("::index"))
    # only the moved codes (a 4-bit byte holds two codes: a changed byte is one or two of them)
    assert positions <= sum(layer.numel() * (1 if quant == "int8" else 2) for layer in codes)
    assert (positions == changed) if quant == "int8" else (changed <= positions <= 2 * changed)


def test_a_tampered_or_misplaced_codes_delta_is_one_line(tmp_path):
    _run(quant="int8", save=str(tmp_path / "d"))
    file = tmp_path / "d" / "delta.safetensors"
    good = load_file(str(file))
    # a layer with at least two moved codes, so that every tampering below applies to it
    name = next(k for k in good if k.endswith("::code") and good[k].numel() > 1).removesuffix("::code")
    index, code = good[f"{name}::index"], good[f"{name}::code"]
    bad_cases = {
        "outside its": {f"{name}::index": index + 10**6},
        "codes outside": {f"{name}::code": torch.full_like(code, -128)},
        "int8 or uint8": {f"{name}::code": code.float()},
        "not a quantized": {"model.embed_tokens.weight::index": index.clone(),
                            "model.embed_tokens.weight::code": code.clone()},
        "names an entry twice": {f"{name}::index": torch.zeros_like(index)},
    }
    for why, change in bad_cases.items():
        save_file({**{k: v for k, v in good.items() if not k.startswith("model.embed")}, **change}, str(file))
        with pytest.raises(UserError, match=why) as e:
            _run(quant="int8", steps=0, delta=str(tmp_path / "d"))
        assert "\n" not in str(e.value)
    save_file(good, str(file))
    with pytest.raises(UserError, match="codes of int8 weights; load it with quant 'int8'"):
        _run(quant="nf4", method="sensitive", steps=0, delta=str(tmp_path / "d"))


@pytest.mark.slow  # two cells, each in its own process (about a minute on a shared 2-core machine)
def test_quzo_cells_run_end_to_end_in_a_tiny_suite(tmp_path):
    suite = parse_suite({"name": "quzo", "reference": False, "defaults": {**TINY, "quant": "int8", "device": "auto"},
                         "matrix": {"quant": ["int8", "nf4"]}}, "quzo.yaml")
    records = load_records(run_suite(suite, tmp_path))
    assert sorted(r.config["quant"] for r in records) == ["int8", "nf4"]
    linear_numel = sum(o * i for o, i in architecture(TINY["model"]).linears)  # every block linear's code
    for rec in records:
        assert rec.ok, rec.reason
        m = rec.metrics
        assert m.get("trainable_numel") == linear_numel and m.get("restore_drift_frac_changed") == 0.0
        assert len(m.get("loss_curve")) == 3 and "peak_mib" in rec.estimate


def _odd_layer(seed: int):
    """A 4-bit layer of 2,053 values (not a whole number of bytes of bits, its last block 5 values) whose first
    value has global index 8 x 37 (mid-tile): (n, offset, packed codes, block absmax, a uniform 16-level grid)."""
    n, gen = 2053, torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=gen)
    absmax = torch.rand((n + 63) // 64, generator=gen) * 0.1 + 1e-3
    return n, 8 * 37, packed, absmax, (torch.linspace(-1, 1, 16, dtype=torch.float64), torch.arange(16),
                                       torch.arange(16))


def test_the_c_4bit_pass_restores_a_layer_of_odd_length_at_an_unaligned_offset():
    """A layer whose length is not a whole number of bytes of bits (n = 2,053) starting mid-tile (offset
    8 x 37): the last byte's padding and a tile that starts inside a byte of codes come back exactly."""
    if fused.path() != fused.C_PATH:
        pytest.skip("the C library is not built here")
    n, offset, packed, absmax, grid = _odd_layer(0)
    bits = torch.zeros((n + 7) // 8, dtype=torch.uint8)
    before = packed.clone()
    assert fused.c_grid4(packed, n, offset, absmax, 64, grid, "rademacher", [(5, 2e-2)], "perturb", bits,
                         noise_seed=9)
    nibbles = lambda p: torch.stack([p >> 4, p & 15], 1).view(-1)[:n]  # noqa: E731
    changed = nibbles(packed) != nibbles(before)
    flags = ((bits.view(-1, 1) >> torch.arange(8)) & 1).view(-1)
    assert changed.any() and torch.equal(flags[:n].bool(), changed) and not flags[n:].any()
    assert fused.c_grid4(packed, n, offset, absmax, 64, grid, "rademacher", [(5, 2e-2)], "restore", bits)
    assert torch.equal(nibbles(packed), nibbles(before))


@pytest.mark.parametrize("mode, lr", [("perturb", 0.0), ("update", 1e-2), ("update", 30.0)])
def test_the_c_4bit_pass_ends_a_layer_of_odd_length_as_the_generic_build_does(mode, lr, tmp_path, monkeypatch):
    """The AVX-512 pass keeps a block's tables in registers (and falls back to memory where an update's move
    passes a level: lr 30); a layer's last run of 5 values is read from the tables the registers left: the
    same codes and bits as a build without AVX-512."""
    if fused.path() != fused.C_PATH:
        pytest.skip("the C library is not built here")
    n, offset, packed, absmax, grid = _odd_layer(3)
    out = []
    for lib in (None, fused.bind(build.load(tmp_path, tuple(f for f in build.FLAGS if f != "-march=native")))):
        if lib is not None:
            monkeypatch.setitem(fused._state, "lib", lib)
        codes, bits = packed.clone(), torch.zeros((n + 7) // 8, dtype=torch.uint8)
        assert fused.c_grid4(codes, n, offset, absmax, 64, grid, "rademacher", [(5, 2e-2 if mode == "perturb"
                             else 0.7)], mode, bits, lr=lr, noise_seed=9)
        out.append((codes, bits))
    assert not torch.equal(out[0][0], packed)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("pos, n", [(0, 16), (3, 13), (5, 2), (8, 21), (7, 1)])
def test_bits_written_at_any_position_read_back_and_leave_their_neighbours(pos, n):
    """The torch path's bit layout (an int8 layer's bits start at offset % 8): a write touches only its bits."""
    gen = torch.Generator().manual_seed(pos * 100 + n)
    bits = torch.randint(0, 256, (6,), dtype=torch.uint8, generator=gen)
    before = get_bits(bits, 0, 48).clone()
    flags = torch.rand(n, generator=gen) < 0.5
    put_bits(bits, pos, flags)
    after = get_bits(bits, 0, 48)
    assert torch.equal(after[pos:pos + n], flags)
    assert torch.equal(after[:pos], before[:pos]) and torch.equal(after[pos + n:], before[pos + n:])


def test_the_c_int8_pass_restores_from_its_bits_at_an_offset_inside_a_byte():
    """An int8 layer whose first value has global index 43 (its bits start at bit 3) and whose values span
    tiles: a perturbation (eps a few steps, stochastic) and its restore, which draws no noise, give every
    code back; the bits say which steps rounded up."""
    codes = torch.randint(-100, 101, (3001,), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    if not fused.c_ready(codes):
        pytest.skip("the C library is not built here")
    cols, offset = 61, 43
    scb = torch.rand((codes.numel() + cols - 1) // cols, generator=torch.Generator().manual_seed(2)) + 0.5
    ups = torch.zeros((codes.numel() + offset % 8 + 7) // 8, dtype=torch.uint8)
    before = codes.clone()
    eps = 2.7 * float(scb.max()) / 127  # a few steps
    kept = fused.c_int8(codes, 0, codes.numel(), cols, offset, scb, "rademacher", [(4, eps)], "perturb", ups,
                        noise_seed=11)
    assert not torch.equal(codes, before)
    up = ((ups.view(-1, 1) >> torch.arange(8)) & 1).view(-1)[offset % 8:offset % 8 + codes.numel()]
    assert 0 < int(up.sum()) < codes.numel()  # some steps rounded up, some down
    fused.c_int8(codes, 0, codes.numel(), cols, offset, scb, "rademacher", [(4, eps)], "restore", ups,
                 kept_at=kept)
    assert torch.equal(codes, before)


@pytest.mark.parametrize("edge", [0.01, 0.5, 1.0])
def test_the_c_int8_perturbation_returns_the_positions_of_the_codes_it_kept(edge):
    """The C pass sets a bit for each code left alone at the range's edge (tiles own their bytes, from bit
    start % 8) and reads them back as positions: those of the torch path's rule, |code +- d| > 127, for a
    chunk that starts inside a byte and inside a tile, ends short of a word, with few kept codes or all."""
    gen = torch.Generator().manual_seed(5)
    layer_n, cols, offset, start, stop = 9000, 75, 1029, 1027, 8990
    codes = torch.randint(-100, 101, (layer_n,), dtype=torch.int8, generator=gen)
    if not fused.c_ready(codes):
        pytest.skip("the C library is not built here")
    codes[torch.rand(layer_n, generator=gen) < edge] = INT8_MAX  # at the edge: kept where d is not 0
    scb = torch.rand(layer_n // cols, generator=gen) + 0.5
    ups = torch.zeros((layer_n + offset % 8 + 7) // 8, dtype=torch.uint8)
    eps = 1.6 * float(scb.max()) / 127  # a step or two
    before = codes.clone()
    z = fused.fill_z(torch.empty(stop - start), offset + start, "rademacher", 4).double()
    unit = scb.double().repeat_interleave(cols)[start:stop] / 127
    d = round_offset(z * eps / unit, uniform(11, offset + start, stop - start, "cpu"))
    c = before[start:stop].long()
    expected = (((c + d).abs() > INT8_MAX) | ((c - d).abs() > INT8_MAX)).nonzero().view(-1)
    kept = fused.c_int8(codes, start, stop, cols, offset, scb, "rademacher", [(4, eps)], "perturb", ups,
                        noise_seed=11)
    assert expected.numel() > 0 and torch.equal(kept, expected)
    assert torch.equal(codes[start:stop].long(), torch.where(
        torch.zeros_like(c, dtype=torch.bool).index_fill_(0, expected, True), c, c + d))
    assert torch.equal(codes[:start], before[:start]) and torch.equal(codes[stop:], before[stop:])


def _level_values(layer, stored: torch.Tensor) -> torch.Tensor:
    """What the stored codes stand for on the layer's grid (float64, flat): int8 codes, or 4-bit levels."""
    codes = decode(layer.kind, stored.view(-1))
    if layer.kind == "int8":
        return codes.double()
    levels, rank, _ = layer.levels()
    return levels[rank[codes]]


@pytest.mark.parametrize("quant, eps", [("nf4-plain", 1e-3), ("int8", 3e-3)])  # some values move, not all
def test_noise_shift_redraws_the_rounding_not_the_direction(quant, eps):
    """A trainable with ``noise_shift`` perturbs along the same z (``layer_z``) with an independent rounding:
    other codes move, each value at most one way the sign of z allows, and its restore is exact."""
    base = [layer.codes.clone() for layer in code_layers(_quantized(quant))]
    own, shifted = (CodeTrainable(code_layers(_quantized(quant)), noise_shift=s) for s in (0, 1 << 40))
    assert torch.equal(own.layer_z(7, 1), shifted.layer_z(7, 1))
    moved = []
    for trainable in (own, shifted):
        trainable.apply(7, eps)
        moved.append([_level_values(layer, layer.codes) - _level_values(layer, b)
                      for layer, b in zip(trainable.layers, base)])
        for k, d in enumerate(moved[-1]):  # a value moves only the way its z points
            assert bool(((d == 0) | (torch.sign(d) == torch.sign(trainable.layer_z(7, k)))).all()), k
        trainable.restore()
        assert all(torch.equal(layer.codes, b) for layer, b in zip(trainable.layers, base))
    assert any(bool((a != 0).any()) for a in moved[0])
    assert any(not torch.equal(a != 0, b != 0) for a, b in zip(*moved))
