"""What the README quotes of a suite is what its committed records say: every generated status block
(zobench/report/status.py) made again from its records must equal the README's, figure for figure, and so
must the hand-written cost table of the quantized-ZO methods."""

from __future__ import annotations

from pathlib import Path

import pytest
from claims_runs import claims, suite_declaring, write_results

from zobench.cell.measures import Metrics
from zobench.cell.record import CellRecord
from zobench.errors import UserError
from zobench.report.status import END, blocks, replace_block, seed_table, status_block
from zobench.results import load_records
from zobench.spec.claims import claims_hash
from zobench.spec.suite import load_suite

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_has_the_claims_suites_status_block():
    assert [(r, s) for r, s, _ in blocks(README)] == [("results/quantized-zo.jsonl", "suites/quantized-zo.yaml"),
                                                      ("results/claims-v2.jsonl", "suites/claims-v2.yaml")]


@pytest.mark.parametrize("results, suite, quoted", blocks(README))
def test_each_status_block_in_the_readme_is_what_its_records_say(results, suite, quoted):
    made = status_block(load_records(ROOT / results), load_suite(ROOT / suite), (ROOT / results).parent)
    assert quoted == made, f"run: python scripts/claims_status.py {results} {suite} --readme README.md"


def test_the_claims_verdicts_the_readme_quotes_by_hand_are_the_generated_blocks():
    """The README's prose quotes claims-v2's final Holm-adjusted intervals above its generated block: each must
    be one the block (made from the records, checked above) states."""
    import re

    prose = README[README.index("**Status: the second round is complete**"):]
    prose = prose[:prose.index("<!-- status generated")]
    block = dict((r, b) for r, _, b in blocks(README))["results/claims-v2.jsonl"]
    quoted = re.findall(r"\[[^\]]+\]", "\n".join(line for line in prose.splitlines() if line.startswith("- ")))
    assert len(quoted) == 4
    top = README[README.index("Status: the trainer"):README.index("## Set-up")]  # the opening summary quotes two
    quoted += re.findall(r"\[[^\]]+\]", top[:top.index("The quantized-ZO comparison")])
    assert len(quoted) == 6
    for interval in quoted:
        assert f"Holm-adjusted {interval}" in block, interval


def test_the_quantized_zo_verdicts_the_readme_quotes_by_hand_are_the_generated_blocks():
    """The same for quantized-zo: the opening summary, the answer at the head of "Which ZO method on a quantized
    model?" and its status bullets quote its final Holm-adjusted intervals; each must be one its block states."""
    import re

    block = dict((r, b) for r, _, b in blocks(README))["results/quantized-zo.jsonl"]
    assert "every declared cell is in" in block  # final: the prose calls them final
    top = README[README.index("The quantized-ZO comparison"):README.index("## Set-up")]
    answer = README[README.index("**The answer on SmolLM2-135M / SST-2**"):README.index("Three routes train")]
    status = README[README.index("**Status: complete** (every record from one clean worktree at fa2feb0"):]
    status = "\n".join(line for line in status[:status.index("Cost in these cells")].splitlines()
                       if line.startswith("- "))
    counts = []
    for prose in (top, answer, status):
        quoted = re.findall(r"\[-?[0-9.]+, [+-]?[0-9.]+\]", prose)
        counts.append(len(quoted))
        for interval in quoted:
            assert f"Holm-adjusted {interval}" in block, interval
    assert counts == [1, 3, 3]


def test_the_seed_table_marks_runs_not_in_apart_from_runs_not_declared(tmp_path):
    suite_file = tmp_path / "s.yaml"
    suite_file.write_text("name: s\ndefaults:\n  model: random:tiny-llama\n  density: 1.0e-3\nmatrix:\n"
                          "  method: [full, random, qzo]\n  seed: [0, 1]\nexclude:\n"
                          "  - {method: [random, qzo], seed: 1}\n"
                          "overrides:\n  - match: {method: qzo}\n    set: {quant: int8}\n")
    suite = load_suite(suite_file)
    m = Metrics()
    m.set(test_best={"accuracy": 0.731})
    done = CellRecord("x", labels={"method": "full", "seed": 0}, config={"method": "full", "seed": 0}, metrics=m)
    table = seed_table([done], suite)
    # full seed 1 is declared and not in yet; random seed 1 is excluded, so its cell stays blank. The suite's
    # density is random's, not QZO's (it trains scales) nor full ZO's: their rows do not show it
    assert table == ["| arm | seed 0 | seed 1 |", "|:---|---:|---:|", "| full | 73.1 | - |",
                     "| qzo on int8 | - |  |", "| random 0.1% | - |  |"]


def test_a_status_before_any_cell_says_what_the_run_waits_on_and_quotes_no_number(tmp_path):
    suite_file = suite_declaring(tmp_path, margin=0.0)
    text = suite_file.read_text().replace("claims:", "lr_pilot:\n  steps: 10\n  grids:\n"
                                          "    - match: {method: sensitive}\n      lr: [1.0e-4, 1.0e-3]\nclaims:")
    suite_file.write_text(text)
    block = status_block([], load_suite(suite_file), tmp_path)
    assert "16 of the suite's cells have no record yet" in block  # 12 trained, a forward reference a seed
    assert "2 of its 2 lr pilot cells have no record yet either" in block
    assert "Learning rates (10-step pilots, by their best dev score): piloting: sensitive 0.1% (0 of 2 in)." in block
    verdicts = [line for line in block.splitlines() if line.startswith("- ")]
    assert verdicts == ["- sensitive beats random: no estimate yet (seeds usable in each arm: 0 and 0): "
                        "**not resolved** (interim)",
                        "- s-like-f: no estimate yet (seeds usable in each arm: 0 and 0): **not resolved** (interim)"]


def test_the_status_quotes_a_changed_claim_as_declared_then_and_only_the_changed_one(tmp_path):
    results = write_results(tmp_path)
    suite_file = suite_declaring(tmp_path, margin=0.30)  # s-beats-r edited after the data: 30 points now
    block = status_block(load_records(results), load_suite(suite_file), results.parent)
    now, _, then = block.partition("As declared earlier")
    assert f"claims hash `{claims_hash(claims())[:12]}`" in then
    # the edited claim twice (now against 30 points, then against 0), the unchanged one once
    assert now.count("sensitive beats random") == 1 and "**does not hold**" in now
    assert then.count("\n- ") == 1 and "sensitive beats random" in then and "**holds**" in then
    assert "s-like-f" in now and "s-like-f" not in then


def test_the_status_names_the_lr_each_arms_pilots_chose_by_the_suites_rule(tmp_path):
    from zobench.spec.matrix import select_cells
    from zobench.spec.pilot import pilot_cells

    suite_file = tmp_path / "s.yaml"
    suite_file.write_text("name: s\ndefaults:\n  model: random:tiny-llama\n  density: 1.0e-3\nmatrix:\n"
                          "  method: [sensitive, random]\nlr_pilot:\n  steps: 10\n  by: last\n  grids:\n"
                          "    - match: {method: sensitive}\n      lr: [1.0e-4, 1.0e-3]\n"
                          "    - match: {method: random}\n      lr: [1.0e-2, 1.0e-1]\n")
    suite = load_suite(suite_file)
    # the last dev score decides: 1e-4 peaked early and fell, 1e-3 ended higher; random's second pilot is not in
    curves = {1e-4: [0.90, 0.60], 1e-3: [0.70, 0.75], 1e-2: [0.80, 0.80]}
    records = []
    for p in pilot_cells(select_cells(suite, None), suite.lr_pilot):
        if p.config.lr in curves:
            m = Metrics()
            m.set(dev_curve=[{"step": 5 * (i + 1), "accuracy": a} for i, a in enumerate(curves[p.config.lr])])
            records.append(CellRecord(p.cell_id, labels=p.labels, config=p.config.to_dict(), metrics=m))
    from zobench.report.status import lr_line

    # 1e-3 is the top of sensitive's grid: a better lr may lie past it, and the line says so, as the report does
    assert lr_line(records, suite) == ("Learning rates (10-step pilots, by their last dev score): chosen: "
                                       "sensitive 0.1% 1e-3 (grid edge); piloting: random 0.1% (1 of 2 in).")


def test_replacing_a_block_touches_nothing_else():
    text = ("before\n<!-- status generated by scripts/claims_status.py from r.jsonl and s.yaml; do not edit -->\n"
            f"old\n{END}\nafter\n")
    assert replace_block(text, "new", "r.jsonl", "s.yaml") == text.replace("old", "new")
    with pytest.raises(UserError, match="no status block made from q.jsonl"):
        replace_block(text, "new", "q.jsonl", "s.yaml")


def test_a_block_is_found_as_written_and_only_when_it_is_the_one():
    marker = "<!-- status generated by scripts/claims_status.py from r.jsonl and s.yaml; do not edit -->"
    crlf = f"before\r\n{marker}\r\nold\r\n{END}\r\nafter\r\n"
    assert replace_block(crlf, "a\nb", "./r.jsonl", "s.yaml") == crlf.replace("old", "a\r\nb")
    twice = f"{marker}\nold\n{END}\n{marker}\nold\n{END}\n"
    with pytest.raises(UserError, match="NOTES.md: 2 status blocks made from r.jsonl and s.yaml; keep one"):
        replace_block(twice, "new", "r.jsonl", "s.yaml", "NOTES.md")


def test_the_script_refuses_a_readme_that_is_a_link_and_keeps_it(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "target.md"
    target.write_text("x\n")
    (tmp_path / "link.md").symlink_to(target)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "claims_status.py"), "results/claims-v2.jsonl",
                          "suites/claims-v2.yaml", "--readme", str(tmp_path / "link.md")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2 and "is a symbolic link" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "link.md").is_symlink() and target.read_text() == "x\n"


def test_the_readmes_quantized_zo_cost_table_is_what_its_records_say():
    """The README's cost table of QZO / QuZO / SensZOQ (hand-written from results/quantized-zo-cost.jsonl):
    each figure made again from the records, so a re-run of the suite cannot leave the README quoting the
    last one."""
    import re

    from zobench.results import derive

    records = load_records(ROOT / "results/quantized-zo-cost.jsonl")
    derived = derive(records)
    cell = {(r.config["method"], r.config["quant"], r.config["malloc"]): r for r in records if r.ok}
    head = "| method | quant | peak MiB, release (vs forward) |"
    lines = README[README.index(head):].splitlines()[2:]
    rows = lines[:next(i for i, x in enumerate(lines) if not x.startswith("|"))]
    method = {"SensZOQ (`sensitive` 0.1%)": "sensitive", "QZO": "qzo", "QuZO": "quzo"}
    assert len(rows) == 5
    for row in rows:
        name, quant, peak, ratio, step, per_token = [c.strip().strip("*") for c in row.strip("|").split("|")]
        release, glibc = cell[(method[name], quant, "release")], cell[(method[name], quant, "glibc")]
        d, g = derived[release.cell_id], derived[glibc.cell_id]
        assert peak == f"{d.peak_mib:.0f} ({100 * (d.peak_over_inference - 1):+.1f}%)", row
        spread = f"({g.step_over_two_forwards_p10:.2f}-{g.step_over_two_forwards_p90:.2f})"
        shown = "1.00 at limit" if g.step_timing == "at limit" else f"{g.step_over_two_forwards:.2f}"
        assert re.sub(r"\*", "", ratio) == f"{shown} {spread}", row
        assert step == f"{glibc.metrics.step_s.median:.2f}", row
        forward = cell[("forward", quant, "glibc")]
        assert per_token == f"{forward.metrics.throughput() / glibc.metrics.throughput() / 2:.2f}", row


def test_the_resolution_account_reads_the_claims_own_runs():
    """scripts/resolution.py on claims-v2's committed records: each fully paired claim's expected half-width
    now is its verdict's interval's (the same model, read from the components), and it projects downwards."""
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "resolution.py"), "results/claims-v2.jsonl",
                          "suites/claims-v2.yaml", "--seeds", "6,40"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    claims_seen = 0
    for block in out.split("\n- ")[1:]:
        if "the verdict reads" in block:  # arms with unpaired seeds: the verdict reads more than the account
            continue
        now, floor = map(float, re.search(r"now (\S+) \(.*any number of seeds on these \d+ examples (\S+) \(",
                                          block).groups())
        low, high = map(float, re.search(r"\[(\S+), (\S+)\] \(half-width", block).groups())
        assert now == pytest.approx((high - low) / 2, rel=0.1) and 0 < floor < now
        claims_seen += 1
    assert claims_seen >= 2
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "resolution.py"), "results/claims-v2.jsonl",
                          "suites/claims-v2.yaml", "--seeds", "1"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "at least 2" in bad.stderr and "Traceback" not in bad.stderr
