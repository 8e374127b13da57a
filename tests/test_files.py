"""Reading user files and writing outputs: one clear error, and never a torn or half-written file.

A full disk is produced for real: the writer runs in a child process under RLIMIT_FSIZE, so the kernel
lets part of a write through (a short write, as on a nearly full filesystem) and refuses the rest.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import limit_file_size, unprivileged

from zobench.errors import OutputError, UserError
from zobench.files import MAX_DEPTH, append_line, parse_json, read_text, text_lines
from zobench.outdirs import check_output_dir, check_output_file


def run_limited(code: str, limit_bytes: int) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python whose files may not grow beyond ``limit_bytes``."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          preexec_fn=limit_file_size(limit_bytes), timeout=120)


def test_append_on_a_full_disk_leaves_the_file_exactly_as_it_was(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"cell_id": "a"}\n' * 100)
    before = p.read_bytes()
    # 200 bytes of room: the kernel takes 200 bytes of the 3 KB line (a short write), then refuses.
    r = run_limited(f"""
        from zobench.files import append_line
        from zobench.errors import OutputError
        try:
            append_line({str(p)!r}, b'{{"cell_id": "b", "pad": "' + b'x' * 3000 + b'"}}\\n')
        except OutputError as e:
            print(e)
            raise SystemExit(2)
        """, len(before) + 200)
    assert r.returncode == 2, r.stderr
    assert "file is unchanged" in r.stdout and str(p) in r.stdout
    assert p.read_bytes() == before  # no 200-byte fragment


def test_append_to_a_device_that_takes_nothing_names_the_cause():
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with pytest.raises(OutputError, match="no space left"):
        append_line("/dev/full", b"{}\n")


def test_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old report\n")
    r = run_limited(f"""
        from zobench.files import atomic_write
        atomic_write({str(target)!r}, "new " * 100_000, "report")
        """, 50_000)
    assert r.returncode != 0 and "cannot write the report" in r.stderr
    assert target.read_text() == "old report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_torn_last_line_is_cut_before_the_next_append(tmp_path, capsys):
    p = tmp_path / "r.jsonl"
    append_line(p, b'{"cell_id": "a"}\n')
    with open(p, "ab") as f:
        f.write(b'{"cell_id": "b", "sta')  # a writer killed mid-line
    append_line(p, b'{"cell_id": "c"}\n')
    assert p.read_bytes() == b'{"cell_id": "a"}\n{"cell_id": "c"}\n'
    assert "removed a torn last line" in capsys.readouterr().err


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfename: x\n", "not UTF-8 text"),
    (None, "is a directory"),
])
def test_read_text_refuses_in_one_line(tmp_path, content, expected):
    p = tmp_path / "suite.yaml"
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    with pytest.raises(UserError, match=expected) as e:
        read_text(p, "suite file")
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_output_locations_are_checked_before_work(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a directory should go")
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(blocker, "results")
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(blocker / "sub", "results")
    with pytest.raises(OutputError, match="not a regular file"):
        check_output_file(tmp_path, "report")
    made = check_output_dir(tmp_path / "new" / "dir", "results")
    assert made.is_dir() and list(made.iterdir()) == []  # the probe file is gone


def test_a_read_only_directory_is_found_by_the_probe(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = subprocess.run([*unprivileged(), sys.executable, "-c", textwrap.dedent(f"""
            from zobench.outdirs import check_output_dir
            check_output_dir({str(ro)!r}, "results")
            """)], capture_output=True, text=True, timeout=60)
    finally:
        ro.chmod(0o755)
    assert r.returncode != 0 and "directory is not writable" in r.stderr


@pytest.mark.parametrize("opener", ["[", '{"k": '])
def test_the_depth_limit_is_exact_whatever_shortcut_reading_takes(opener):
    """parse_json skips its walk when the text has fewer brackets than the limit: at the limit and one beyond
    it, with brackets inside strings to mislead a count, the verdict is the walk's."""
    closer = "]" if opener == "[" else "}"

    def nested(depth: int) -> str:
        return opener * (depth - 1) + '["[[{{", "]]"]' + closer * (depth - 1)

    assert parse_json(nested(MAX_DEPTH), "x.json") is not None
    with pytest.raises(UserError, match="nested deeper"):
        parse_json(nested(MAX_DEPTH + 1), "x.json")
    assert parse_json(nested(2).encode(), "x.json") is not None  # bytes are walked, never counted


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": -Infinity}', '{"a": 1e999}', '[1.5, -2e400]',
                                  '{"a": ' + "9" * 400 + '.0}'])
def test_a_number_that_is_not_finite_is_refused_however_it_is_spelled(text):
    with pytest.raises(UserError, match="x.json: not valid JSON"):
        parse_json(text, "x.json")
    assert parse_json('{"a": 1e308, "b": -2.5e-300}', "x.json") == {"a": 1e308, "b": -2.5e-300}


def test_a_lone_surrogate_is_not_text_and_a_bad_byte_is_found_on_its_own_line(tmp_path):
    """"\\ud800" is valid JSON and parses to a string no encoder takes (a tokenizer, a hash, a write failed on
    it later): refused where it is read. A byte that is not UTF-8 is reported on its line, not on the line
    the reader had reached when its read-ahead met it."""
    for text in ('{"a": "\\ud800"}', '["x\\uDFFFy"]', '{"\\udbff": 1}'):
        with pytest.raises(UserError, match="x.json: a string holds a lone surrogate"):
            parse_json(text, "x.json")
    assert parse_json('["\\ud83d\\ude00", "\\u00e9"]', "x.json") == ["\U0001f600", "\u00e9"]  # a pair is text
    bad = tmp_path / "d.tsv"
    bad.write_bytes(b"".join(b"row %d\n" % i for i in range(5000)) + b"\xff\n")
    with pytest.raises(UserError, match=r"d.tsv:5001: data file is not UTF-8 text"):
        list(text_lines(bad))


@pytest.mark.parametrize("spelled", ["9" * 309, "-" + "9" * 309, "9" * 5000, "0x" + "F" * 300])
def test_an_integer_no_float_can_hold_is_refused_in_json_and_yaml(spelled):
    """An integer past 1e308 parses (Python's ints have no bound) and then overflows every float() or
    math.isfinite() a setting, a budget or a record's figure meets: refused where it is read, in one line."""
    from zobench.spec.yaml_text import parse_yaml

    if not spelled.startswith("0x"):
        with pytest.raises(UserError, match="x.json: not valid JSON .*too large"):
            parse_json('{"lr": ' + spelled + "}", "x.json")
    with pytest.raises(UserError, match="x.yaml:1: not valid YAML .*too large"):
        parse_yaml("lr: " + spelled, "x.yaml")
    big = "9" * 308  # the largest spelled out that zobench reads: a float holds it
    assert parse_json("[" + big + "]", "x.json") == [int(big)] and parse_yaml("a: " + big, "x.yaml") == {"a": int(big)}
    assert parse_yaml("a: 0x1F\nb: 1_000", "x.yaml") == {"a": 31, "b": 1000}


def test_yaml_plain_values_are_typed_as_yaml_1_2_core_does():
    """PyYAML types plain values by YAML 1.1, where `seed: 010` is 8, `steps: 1:30` is 90 and `on` is True: a
    suite would run with a number its author did not write. zobench reads them as YAML 1.2's core schema
    does, and refuses the one spelling the two disagree on."""
    from zobench.spec.yaml_text import parse_yaml

    got = parse_yaml("a: 1:30\nb: on\nc: yes\nd: 2026-12-05\ne: 1e-4\nf: 0o17\ng: true\nh: -12\ni: .inf\nj: 0b11",
                     "x.yaml")
    assert got == {"a": "1:30", "b": "on", "c": "yes", "d": "2026-12-05", "e": 1e-4, "f": 15, "g": True,
                   "h": -12, "i": float("inf"), "j": "0b11"}
    for spelled in ("010", "-007", "00"):
        with pytest.raises(UserError, match=rf"x.yaml:2: not valid YAML \('{spelled}': an integer with a leading zero"):
            parse_yaml("a: 1\nseed: " + spelled, "x.yaml")
    assert parse_yaml("a: 0\nb: '010'", "x.yaml") == {"a": 0, "b": "010"}  # quoted: a string, as written
    # an explicit tag brings back neither YAML 1.1's spellings nor its other types
    for tagged, why in (("!!bool yes", "'yes' is not true or false"), ("!!int 0x1_0", "'0x1_0' is not an integer"),
                        ("!!float 1:30", "'1:30' is not a number"), ("!!binary aGVsbG8=", "the tag !!binary is not"),
                        ("!!timestamp 2001-12-14", "the tag !!timestamp"), ("!!set {a: null}", "the tag !!set")):
        with pytest.raises(UserError, match=re.escape(why)):
            parse_yaml("a: " + tagged, "x.yaml")
    assert parse_yaml("a: !!int 12\nb: !!float 3\nc: !!str 010\nd: !!bool true", "x.yaml") == \
        {"a": 12, "b": 3.0, "c": "010", "d": True}


def test_a_yaml_1_1_number_reaches_a_setting_as_the_string_it_was(tmp_path):
    """`steps: 1:30` is a string now; the setting that wants an integer says so in one line."""
    from zobench.spec.matrix import expand
    from zobench.spec.suite import load_suite

    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ndefaults:\n  model: random:tiny-llama\n  steps: 1:30\nmatrix:\n  method: [full]\n")
    with pytest.raises(UserError, match=r"key 'steps' = '1:30': expected int"):
        expand(load_suite(suite))


def test_files_written_through_a_temporary_file_get_the_permissions_a_plain_write_would(tmp_path):
    """A temporary file or folder is created 0600 / 0700; renamed into place, it made every report, delta
    and checkpoint readable by its owner alone. A new file gets 0666 less the umask, a rewritten one keeps
    its mode, and a build folder gets 0777 less the umask."""
    from zobench.files import atomic_write, temp_dir

    umask = os.umask(0o027)
    try:
        fresh = atomic_write(tmp_path / "report.md", "x")
        assert fresh.stat().st_mode & 0o777 == 0o640
        kept = tmp_path / "kept.md"
        kept.write_text("old")
        kept.chmod(0o604)
        atomic_write(kept, "new")
        assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o604
        assert temp_dir(tmp_path, ".stage-").stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(umask)


def test_a_json_key_given_twice_is_refused():
    """json keeps the last of two equal keys without a word: a record, delta or checkpoint could say one thing
    to a reader who looks and another to zobench. zobench writes none, so one is refused in one line."""
    with pytest.raises(UserError, match=r"x.json: not valid JSON \(key 'lr' given twice in one object\)"):
        parse_json('{"a": {"lr": 1e-4, "b": 2, "lr": 1e-2}}', "x.json")
    assert parse_json('{"a": {"lr": 1e-4}, "b": [{"lr": 1}, {"lr": 2}]}', "x.json") == \
        {"a": {"lr": 1e-4}, "b": [{"lr": 1}, {"lr": 2}]}
