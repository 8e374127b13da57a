"""Generated garbage thrown at everything zobench reads from a file (docs/security.md): the suite parser, the
delta loader, the results reader, checkpoints and influence caches, and ``main()`` on top of them. Each must
give a valid object or one ``UserError`` line (exit 2), never another exception, and never touch anything
outside the output it was given. In-process, with a bounded number of examples, so CI time stays small."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zobench.cli import main
from zobench.errors import UserError

# CI runs a bounded number of examples, the same ones every run (derandomized: a landing never hangs on a
# draw); ZOBENCH_FUZZ_EXAMPLES=2000 explores with fresh random draws (minutes): run it when touching parsers.
EXAMPLES = int(os.environ.get("ZOBENCH_FUZZ_EXAMPLES", "60"))
EXPLORE = "ZOBENCH_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not EXPLORE,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=20)
SUITE_KEYS = ["name", "defaults", "matrix", "exclude", "overrides", "budgets", "timeout_s", "reference", "lr_pilot",
              "model", "method", "steps", "lr", "density", "quant", "match", "set", "grids", "peak_mib_max"]
suite_like = st.recursive(scalars | st.sampled_from(SUITE_KEYS),
                          lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                  st.dictionaries(st.sampled_from(SUITE_KEYS) | st.text(max_size=8),
                                                                  inner, max_size=5)), max_leaves=25)


def outcome(fn) -> str:
    """'ok' or 'refused'; any other exception fails the test with its traceback."""
    try:
        fn()
    except UserError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), repr(e)
        return "refused"
    return "ok"


@FUZZ
@given(data=suite_like)
def test_the_suite_parser_takes_any_structure(data):
    from zobench.spec.suite import parse_suite

    outcome(lambda: parse_suite(data, "fuzz.yaml"))


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_the_yaml_reader_takes_any_text(text):
    from zobench.spec.suite import parse_suite
    from zobench.spec.yaml_text import parse_yaml

    outcome(lambda: parse_suite(parse_yaml(text, "fuzz.yaml"), "fuzz.yaml"))


@FUZZ
@given(lines=st.lists(st.one_of(json_values.map(lambda v: json.dumps(v)), st.text(max_size=60),
                                st.dictionaries(st.sampled_from(["cell_id", "status", "config", "metrics", "phases",
                                                                 "labels", "schema", "kind"]), json_values,
                                                max_size=6).map(json.dumps)), max_size=6))
def test_the_results_reader_takes_any_lines(tmp_path_factory, lines):
    from zobench.results import load_records

    path = tmp_path_factory.mktemp("r") / "r.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    outcome(lambda: load_records(path))


@pytest.fixture(scope="module")
def delta_json(tmp_path_factory) -> dict:
    """A valid delta.json of the tiny model (as written by a 2-step sparse run)."""
    from test_security import TINY

    from zobench.cell.pipeline import Pipeline
    from zobench.spec.config import CellConfig

    out = tmp_path_factory.mktemp("fuzz") / "delta"
    Pipeline(CellConfig.from_dict(dict(TINY, save=str(out)))).run()
    return json.loads((out / "delta.json").read_text())


def mutate(meta: dict, path: list[str], value):
    """``meta`` with the field at ``path`` (a list of keys, followed while they exist) set to ``value``."""
    meta = json.loads(json.dumps(meta))
    at = meta
    for key in path[:-1]:
        if isinstance(at.get(key), dict):
            at = at[key]
    at[path[-1]] = value
    return meta


FIELDS = [["format"], ["kind"], ["step"], ["base"], ["base", "model"], ["base", "fingerprint"], ["config"],
          ["config", "method"], ["config", "lr"], ["config", "steps"], ["config", "model"], ["config", "quant"],
          ["config", "trust_remote_code"], ["parent"], ["trajectory"], ["config", "data_dir"]]


@FUZZ
@given(path=st.sampled_from(FIELDS), value=json_values)
def test_the_delta_loader_takes_any_field_value(tmp_path_factory, delta_json, path, value):
    from zobench.cell import delta as D

    d = tmp_path_factory.mktemp("d")
    (d / "delta.json").write_text(json.dumps(mutate(delta_json, path, value), allow_nan=True))
    result = []
    outcome(lambda: result.append(D.read(d)))
    if result:
        assert result[0]["config"].get("trust_remote_code") is None  # never comes from a file
        assert isinstance(result[0]["step"], int) and result[0]["step"] >= 0


@FUZZ
@given(data=json_values)
def test_a_checkpoint_is_any_json_and_only_a_valid_one_is_used(tmp_path_factory, data):
    from zobench.cell import checkpoint

    path = tmp_path_factory.mktemp("c") / "c.json"
    path.write_text(json.dumps(data))
    ckpt, why = checkpoint.load(path, "abc")
    assert ckpt is None or (isinstance(ckpt.step, int) and len(ckpt.trajectory) >= ckpt.step)


numbers = st.one_of(st.integers(-3, 2**65), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=2), st.none())
pairs = st.one_of(st.lists(numbers, min_size=2, max_size=2), st.lists(numbers, max_size=3), numbers)


@FUZZ
@given(cell=st.sampled_from(["abc", "xyz"]), step=numbers, trajectory=st.one_of(
    st.lists(st.one_of(st.lists(pairs, max_size=2), numbers), max_size=5), numbers))
def test_a_checkpoint_shaped_file_is_used_exactly_when_it_is_valid(tmp_path_factory, cell, step, trajectory):
    """Checkpoint-shaped data, valid and not: the loader takes it exactly when its step is a whole number in
    range, its first ``step`` steps are lists of [seed, finite coefficient] pairs, and it is this cell's."""
    from zobench.cell import checkpoint
    from zobench.cell.delta_check import MAX_SEED
    from zobench.spec.config import LIMITS

    def whole(x, high):
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= high

    def finite(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < float("inf")

    valid = cell == "abc" and whole(step, LIMITS["steps"]) and isinstance(trajectory, list) and \
        len(trajectory) >= step and all(isinstance(d, list) and d and all(
            isinstance(p, list) and len(p) == 2 and whole(p[0], MAX_SEED - 1) and finite(p[1]) for p in d)
            for d in trajectory[:step])
    path = tmp_path_factory.mktemp("c") / "c.json"
    path.write_text(json.dumps({"cell_id": cell, "config": {}, "step": step, "trajectory": trajectory}))
    ckpt, why = checkpoint.load(path, "abc")
    assert (ckpt is not None) == bool(valid), (why, step, trajectory)
    assert (why is None) == bool(valid)


@FUZZ
@given(spec=st.dictionaries(st.sampled_from(["model", "k", "scope", "dtype", "max_length", "density", "adapter",
                                             "delta", "sketch_seed", "normalize", "evil"]), json_values, max_size=5))
def test_an_influence_cache_spec_is_checked_like_flags(tmp_path_factory, spec):
    from zobench.influence.cache import load_cache_dir

    d = tmp_path_factory.mktemp("cache")
    (d / "spec.json").write_text(json.dumps(spec))
    (d / "examples.jsonl").write_text('{"id": 0, "instruction": "a", "input": "", "output": "b"}\n')
    outcome(lambda: load_cache_dir(d))


@settings(max_examples=max(25, EXAMPLES // 2), deadline=None, derandomize=not EXPLORE,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["check", "report", "run-dry", "estimate"]), text=st.text(max_size=200))
def test_main_on_garbage_files_exits_0_1_or_2_and_touches_nothing_else(tmp_path_factory, capsys, command, text):
    root = tmp_path_factory.mktemp("m")
    sentinel = root / "sentinel.txt"
    sentinel.write_text("keep")
    f = root / ("in.jsonl" if command in ("check", "report") else "in.yaml")
    f.write_text(text, encoding="utf-8", errors="replace")
    argv = {"check": ["check", f, "--suite", f], "report": ["report", f, "--out", root / "rep"],
            "run-dry": ["run", f, "--dry-run"], "estimate": ["estimate", f]}[command]
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert sentinel.read_text() == "keep"
    assert {p.name for p in root.iterdir()} <= {"sentinel.txt", f.name, "rep"}
