"""Suite validation, matrix expansion, and the CLI's bad-input contract (one line, exit 2)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from helpers import zobench

from zobench.errors import UserError
from zobench.spec.config import CellConfig
from zobench.spec.matrix import expand
from zobench.spec.selectors import parse_selector, selector_matches
from zobench.spec.suite import load_suite

ALL_SUITES = sorted((Path(__file__).resolve().parents[1] / "suites").glob("*.yaml"))
INFLUENCE = [p for p in ALL_SUITES if yaml.safe_load(p.read_text()).get("type") == "influence"]
SUITES = [p for p in ALL_SUITES if p not in INFLUENCE]


@pytest.mark.parametrize("path", INFLUENCE, ids=[p.stem for p in INFLUENCE])
def test_every_shipped_influence_suite_validates(path):
    from zobench.spec.influence import parse_influence_suite

    suite = parse_influence_suite(yaml.safe_load(path.read_text()), str(path), path)
    assert suite.name == path.stem
    assert suite.cache_spec().k % max(suite.ks) == 0


@pytest.mark.parametrize("cache, message", [
    ({"scope": "everything"}, "cache: key 'scope': expected one of lora, all, sensitive, got 'everything'"),
    ({"k": 0}, "cache: key 'k': expected a positive integer, got 0"),
    ({"delta": "some/where"}, "cache: key 'delta': a suite caches the model it fine-tunes itself"),
    ({"adapter": "some/where"}, "cache: key 'adapter': a suite caches the model it fine-tunes itself"),
])
def test_an_influence_suites_cache_settings_are_checked_as_pure_data(cache, message, tmp_path):
    """The spec validates an influence suite like every suite, without reading the files a cache may name: a
    suite caches the model it fine-tunes itself, so an adapter or a delta there is refused up front."""
    from zobench.spec.influence import parse_influence_suite

    with pytest.raises(UserError) as e:
        parse_influence_suite({"type": "influence", "name": "x", "cache": cache}, "s.yaml", Path("s.yaml"))
    assert str(e.value) == f"s.yaml: {message}"


@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_every_shipped_suite_validates(path):
    suite = load_suite(path)
    cells = expand(suite)
    assert suite.name == path.stem
    assert cells, "a suite with no cells"
    methods = {c.config.method for c in cells}
    assert "forward" in methods  # every suite measures against inference
    assert len({c.cell_id for c in cells}) == len(cells)


def test_matrix_expansion_overrides_and_reference_cells(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("""
name: s
defaults: {model: "random:tiny-llama", steps: 3}
matrix:
  method: [full, random, sensitive]
  density: [1.0e-3, 1.0e-2]
overrides:
  - match: {method: full}
    set: {lr: 1.0e-7}
""")
    cells = expand(load_suite(p))
    by_method: dict[str, list] = {}
    for c in cells:
        by_method.setdefault(c.config.method, []).append(c)
    # density does not multiply full ZO or the forward reference
    assert len(by_method["full"]) == 1 and len(by_method["forward"]) == 1
    assert len(by_method["random"]) == 2 and len(by_method["sensitive"]) == 2
    assert by_method["full"][0].config.lr == 1e-7
    assert by_method["random"][0].config.lr == 1e-6
    assert cells[0].config.method == "forward" and cells[1].config.method == "full"
    assert "density" not in by_method["full"][0].labels


@pytest.mark.parametrize("axis, values", [("shared_prompt", [True, False]), ("n_train", [64, 128]),
                                         ("dev_from", ["train", "validation"])])
def test_settings_that_change_the_training_batches_give_each_value_its_own_forward_reference(tmp_path, axis, values):
    """``shared_prompt`` halves a two-option task's training sequences; ``n_train`` and ``dev_from`` choose
    which rows are trained on. A cell was compared against the forward cell of the suite's default value
    (a shared_prompt: false cell against a forward of half its sequences); now against its own."""
    from zobench.spec.matrix import reference_key

    p = tmp_path / "s.yaml"
    p.write_text(f"""
name: s
defaults: {{model: "random:tiny-llama", steps: 3, task: sst2}}
matrix:
  method: [random]
  {axis}: {json.dumps(values)}
""")
    cells = expand(load_suite(p))
    refs = [c for c in cells if c.config.method == "forward"]
    assert sorted(str(getattr(c.config, axis)) for c in refs) == sorted(map(str, values))
    key = {(c.config.method, getattr(c.config, axis)): reference_key(c.config.to_dict()) for c in cells}
    a, b = values
    assert key["random", a] == key["forward", a] != key["forward", b] == key["random", b]


@pytest.mark.parametrize("axis, values, old", [("malloc", ["glibc", "release"], "release"),
                                                ("pack", [True, False], False)])
def test_an_axis_that_changes_what_a_step_costs_gives_each_value_its_own_forward_reference(tmp_path, axis,
                                                                                          values, old):
    """``malloc`` (the host allocator: what a forward costs) and ``pack`` (what each batch holds) are settings
    like any other: each value its own cells (ids, --resume), and a training cell is compared against the
    forward cell with the same value. A record from before the setting existed (no such key in its config)
    reads as the value every cell had then, and that value keeps the ids cells had before."""
    from zobench.spec.matrix import identity, reference_key

    p = tmp_path / "s.yaml"
    p.write_text(f"""
name: s
defaults: {{model: "random:tiny-llama", steps: 3}}
matrix:
  method: [random]
  {axis}: {json.dumps(values)}
""")
    cells = expand(load_suite(p))
    got = sorted(((c.config.method, str(getattr(c.config, axis))) for c in cells))
    assert got == sorted((m, str(v)) for m in ("forward", "random") for v in values)
    assert len({c.cell_id for c in cells}) == 4
    ref = {(c.config.method, getattr(c.config, axis)): reference_key(c.config.to_dict()) for c in cells}
    a, b = values
    assert ref["random", a] == ref["forward", a] != ref["forward", b] == ref["random", b]
    before = {k: v for k, v in cells[0].config.to_dict().items() if k != axis}
    assert reference_key(before) == ref["forward", old]
    at_old = next(c for c in cells if c.config.method == "forward" and getattr(c.config, axis) == old)
    assert axis not in identity(at_old.config)  # at its old value: ids from before are kept


def test_an_unknown_allocator_is_refused_naming_the_key(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: s\ndefaults: {malloc: jemalloc}\n")
    with pytest.raises(UserError, match="malloc"):
        expand(load_suite(p))


BAD = {
    "unknown top key": ("name: s\nmatrx: {}\n", "unknown key 'matrx'; did you mean 'matrix'?"),
    "unknown cell key": ("name: s\ndefaults: {stepz: 3}\n", "defaults: unknown key 'stepz'; did you mean 'steps'?"),
    "wrong type": ("name: s\ndefaults: {steps: many}\n", "key 'steps' = 'many': expected int"),
    "bad method": ("name: s\nmatrix: {method: [ful]}\n", "did you mean 'full'?"),
    "bad selector": ("name: s\nbudgets:\n  - match: {methd: full}\n    peak_mib_max: 3\n",
                     "budgets[0].match: unknown key 'methd'"),
    "bad budget": ("name: s\nbudgets:\n  - peak_mib: 3\n", "budgets[0]: unknown key 'peak_mib'"),
    "matrix not a list": ("name: s\nmatrix: {method: full}\n", "matrix.method: expected a non-empty list"),
    "yaml syntax": ("name: s\ndefaults: {steps: [\n", "not valid YAML"),
    "no name": ("defaults: {}\n", "key 'name'"),
    "unknown quant": ("name: s\nmatrix: {quant: [none, nf5]}\n", "key 'quant': unknown quant backend 'nf5'"),
    # a section of entries given as one value (a number was a TypeError, a string read letter by letter)
    "budgets not a list": ("name: s\nbudgets: 5\n", "key 'budgets': expected a list of entries"),
    "overrides not a list": ("name: s\noverrides: true\n", "key 'overrides': expected a list of entries"),
    "exclude not a list": ("name: s\nexclude: method=full\n", "key 'exclude': expected a list of entries"),
    "grids not a list": ("name: s\nlr_pilot: {steps: 10, grids: 3}\n", "lr_pilot.grids: expected a list of entries"),
    "a device no cell runs on": ("name: s\ndefaults: {device: gpu}\n", "key 'device' = 'gpu': expected auto, cpu"),
    "a negative seed": ("name: s\nmatrix: {seed: [0, -1]}\n", "key 'seed' = -1: expected a whole number in [0, 2**63)"),
    "a huge integer": ("name: s\ndefaults: {lr: " + "9" * 400 + "}\n", "too large for a number zobench reads"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_suites_name_the_file_and_key(tmp_path, case):
    text, expected = BAD[case]
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        load_suite(p)
    assert str(p) in str(e.value)
    assert expected in str(e.value)


@pytest.mark.parametrize("case", ["unknown cell key", "bad selector"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case):
    p = tmp_path / "bad.yaml"
    p.write_text(BAD[case][0])
    r = zobench("run", p, "--dry-run")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zobench: error: ") and str(p) in lines[0]
    assert "Traceback" not in r.stderr


def test_cli_missing_suite_file(tmp_path):
    r = zobench("run", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "suite file not found" in r.stderr and "Traceback" not in r.stderr


def test_selectors():
    sel = parse_selector("method=sensitive|random,density=1e-3", "--only")
    assert selector_matches(sel, {"method": "random", "density": 0.001})
    assert not selector_matches(sel, {"method": "full", "density": 0.001})
    assert not selector_matches(sel, {"method": "random", "density": 0.01})
    with pytest.raises(UserError, match="unknown key 'metod'"):
        parse_selector("metod=full", "--only")


def test_a_selector_is_refused_when_it_could_not_mean_what_it_says():
    """`--only method=full,method=random` kept `random` alone, `--only ,,` selected every cell, and a value of
    .inf was within the numeric tolerance of every number (a claim's arm `{lr: .inf}` took every run)."""
    from zobench.errors import UserError
    from zobench.spec.selectors import parse_selector, selector_matches

    with pytest.raises(UserError, match=r"--only: key 'method' given twice; give its values once \(method=a\|b\)"):
        parse_selector("method=full,method=random", "--only")
    for empty in (",,", " , "):
        with pytest.raises(UserError, match="--only: an empty selector"):
            parse_selector(empty, "--only")
    for sel in ("lr=.inf", {"lr": float("inf")}, {"density": [1e-3, float("nan")]}):
        with pytest.raises(UserError, match="expected a finite number"):
            parse_selector(sel, "x.yaml: claims[0].a")
    assert selector_matches(parse_selector("lr=1e-4|1e-3", "--only"), {"lr": 1e-3})
    assert not selector_matches({"lr": [1e-4]}, {"lr": float("inf")})


NUMERIC = [f.name for f in dataclasses.fields(CellConfig) if f.type in ("int", "float", "int | None", "float | None")]


@pytest.mark.parametrize("key", NUMERIC)
def test_every_numeric_setting_has_a_range_and_minus_one_is_outside_it(key):
    """No number a cell reads is negative in any real run (a seed, a count, a rate, a bound, a fraction,
    a timeout), so -1 must be refused naming the key: a numeric setting added without a range check fails
    here (momentum and weight_decay had none, and ran)."""
    assert len(NUMERIC) >= 24  # the settings were found (their annotations are strings under `annotations`)
    with pytest.raises(UserError, match=f"key '{key}'"):
        CellConfig.from_dict({key: -1}, "s.yaml")
