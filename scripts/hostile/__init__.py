"""Hostile and careless inputs for zobench, and the harness that runs them (scripts/hostile_check.py).

Case classes: loss (data loss), code (code execution from a file), model (silently wrong models),
bomb (resource bombs and hangs), exit (wrong exit codes), keep (what must keep holding).
"""

from __future__ import annotations


def all_cases():
    from hostile import cases_bomb, cases_code, cases_exit, cases_keep, cases_loss, cases_model

    cases = [c for m in (cases_loss, cases_code, cases_model, cases_bomb, cases_exit, cases_keep) for c in m.CASES]
    names = [c.name for c in cases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"case names given twice: {sorted(dup)}")
    return cases
