"""Methods as plug-ins: every registered method prices itself and runs the smoke path; the registry refuses
a duplicate or an incomplete method; LeZO perturbs and updates only the blocks it draws."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from zobench.methods import METHODS, Method, Price, register


def test_every_registered_method_runs_the_smoke_path_and_has_a_price(every_method):
    from zobench.results import derive

    assert set(every_method) == set(METHODS.names())
    for name, rec in every_method.items():
        assert rec.ok, f"{name}: {rec.reason}"
        assert "peak_mib" in rec.estimate, f"{name}: no estimate: {rec.estimate}"
        measured = derive([rec])[rec.cell_id].peak_mib
        assert abs(rec.estimate["peak_mib"] - measured) <= 0.10 * measured, (name, rec.estimate, measured)
        if METHODS.get(name)().info.family != "reference":
            assert len(rec.metrics.get("loss_curve")) == 2 and rec.metrics.step_s.n == 1, name
        moved = rec.metrics.get("perturb_frac_changed")  # measured for every ZO trainable, at eps 1e-3
        if name in ("full", "random", "sensitive", "magnitude", "task_grad", "qzo"):
            assert moved == 1.0, (name, moved)  # float values: each one moves
        elif name in ("lezo", "quzo"):
            assert 0 < moved < 1, (name, moved)  # LeZO perturbs some layers; QuZO moves some int8 codes
        else:
            assert moved is None, (name, moved)  # first-order, LoRA, forward: no ZO perturbation


def test_registration_checks_the_declaration_and_the_interface_and_refuses_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        @register
        class Again(Method):
            name = "full"

            def build_stepper(self, run):
                return None, None

            def price(self, inputs):
                return Price()

    with pytest.raises(TypeError, match="not declared in zobench/spec/catalog.py"):
        @register
        class Undeclared(Method):
            name = "no-such-method"

            def build_stepper(self, run):
                return None, None

            def price(self, inputs):
                return Price()

    with pytest.raises(TypeError, match="does not implement price"):
        @register
        class NoPrice(Method):
            name = "full"

            def build_stepper(self, run):
                return None, None

    with pytest.raises(TypeError, match="does not implement build_mask"):
        @register
        class NoMask(Method):
            name = "random"  # declared with needs_mask

            def build_stepper(self, run):
                return None, None

            def price(self, inputs):
                return Price()
    assert "no-such-method" not in METHODS and METHODS.get("full").__name__ == "Full"


def test_every_declared_method_is_registered_and_declares_a_known_family():
    from zobench.spec.catalog import FAMILIES, METHOD_INFO
    from zobench.spec.config import CellConfig

    assert all(m.family in FAMILIES for m in METHOD_INFO)
    assert {m.name for m in METHOD_INFO} == set(METHODS.names())
    lora = METHODS.get("lora")().info.summary  # the catalog's line names the adapter a lora cell trains
    cfg = CellConfig(method="lora")
    assert f"r={cfg.lora_r} on {'/'.join(cfg.lora_modules)}" in lora


def test_trainables_and_steppers_declare_what_they_can_do_and_implement_exactly_that():
    """The cell asks a trainable whether it snapshots or saves its weights raw, and a stepper whether a
    checkpoint can resume it, without probing: each declaration must match what the class implements."""
    from zobench.zo.fo import FOTrainer
    from zobench.zo.trainable import Trainable
    from zobench.zo.trainer import ForwardOnly, Stepper, ZOTrainer

    def subclasses(cls):
        return {c for s in cls.__subclasses__() for c in {s} | subclasses(s)}

    shapes = subclasses(Trainable)  # importing zobench.methods imported every one (LeZO's LayerSubset too)
    assert {c.__name__ for c in shapes} >= {"DenseTrainable", "SparseTrainable", "LayerSubset"}
    for cls in shapes:
        assert cls.snapshots == (cls.snapshot is not Trainable.snapshot), cls
        assert cls.saves_raw == (cls.save_raw is not Trainable.save_raw) == (cls.load_raw is not Trainable.load_raw)
        assert cls.keeps_own_delta == (cls.delta_parts is not Trainable.delta_parts), cls
    assert {c.__name__ for c in shapes if c.snapshots} == {"SparseTrainable", "ScaleTrainable"}
    assert {c.__name__ for c in shapes if c.keeps_own_delta} == {"ScaleTrainable", "CodeTrainable"}
    assert {c.__name__ for c in shapes if c.saves_raw} == {"DenseTrainable", "LayerSubset", "CodeTrainable"}
    assert subclasses(Stepper) >= {ZOTrainer, ForwardOnly, FOTrainer}
    assert [c.resumable for c in (ZOTrainer, ForwardOnly, FOTrainer)] == [True, False, False]


def test_validating_a_suite_imports_no_torch():
    code = ("import sys; from zobench.spec.suite import load_suite; from zobench.spec.matrix import select_cells; "
            "cells = select_cells(load_suite('suites/smollm2-quant.yaml')); assert len(cells) == 16; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')); "
            "assert not bad, bad[:5]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# -- LeZO -------------------------------------------------------------------------------------------------

@pytest.fixture()
def lezo(tiny):
    from zobench.methods.lezo import LayerSubset, units
    from zobench.zo.masks import scoped_params
    from zobench.zo.trainable import DenseTrainable

    groups = units(scoped_params(tiny.model, "all"))
    parts = [DenseTrainable(g, "rademacher", tag=f"u{u}") for u, g in enumerate(groups)]
    return tiny.model, groups, LayerSubset(parts, k=1)


def _changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_lezo_units_are_the_blocks_plus_the_rest(lezo):
    model, groups, _ = lezo
    assert len(groups) == model.config.num_hidden_layers + 1
    assert all(all(f".layers.{i}." in n for n, _ in g) for i, g in enumerate(groups[:-1]))
    assert not any(".layers." in n for n, _ in groups[-1])  # embeddings, final norm


def test_lezo_perturbs_restores_and_updates_only_the_drawn_unit(lezo):
    from zobench.methods.lezo import unit_seed
    from zobench.zo.optim import make_optimizer

    model, groups, subset = lezo
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seed = 1234
    (u,) = subset.drawn(seed)
    z = dict(zip((n for n, _ in groups[u]), subset.parts[u].directions(unit_seed(seed, u))))
    params = dict(model.named_parameters())
    subset.apply(seed, 1e-3)
    assert _changed(model, before) == set(z)
    assert all(torch.allclose(params[n].detach(), before[n] + 1e-3 * z[n], atol=1e-6) for n in z)
    subset.restore()  # in place, as dense ZO restores: within rounding of eps, not bit for bit
    ulps = 4 * torch.finfo(torch.float32).eps
    assert all(torch.allclose(params[n].detach(), before[n], rtol=0,
                              atol=ulps * max(float(before[n].abs().max()), 1e-3)) for n in z)
    subset.apply(seed, -1e-3)
    subset.update([(seed, 0.5)], make_optimizer("sgd", 1e-3), 0)  # restore folded into the update
    assert _changed(model, before) == set(z)
    assert all(torch.allclose(params[n].detach(), before[n] - 1e-3 * 0.5 * z[n], atol=1e-6) for n in z)
    drawn = {subset.drawn(s)[0] for s in range(200)}
    assert drawn == set(range(len(groups)))  # over steps, every unit is trained


def test_lezo_units_draw_independent_directions(lezo):
    model, groups, subset = lezo
    a, b = subset.parts[0], subset.parts[1]  # two blocks of the same shapes
    from zobench.methods.lezo import unit_seed

    za, zb = a.directions(unit_seed(7, 0))[0], b.directions(unit_seed(7, 1))[0]
    assert za.shape == zb.shape and not torch.equal(za, zb)
