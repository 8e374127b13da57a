"""`make gpu-plan` on a CPU machine: what `make gpu-check` would run on a GPU, and that it fits 8 minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the plan is checked on CPU machines; a GPU runs it")
def test_gpu_check_plans_within_8_minutes_on_any_machine(tmp_path):
    """`make gpu-plan`: the steps of `make gpu-check` and their time plan, without a GPU."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "scripts" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    head = done.stdout.splitlines()[0]
    planned = float(head.split(" s planned")[0].rsplit(" ", 1)[1])
    assert planned <= 480, head
    steps = [line for line in done.stdout.splitlines()[1:] if " planned " in line or " measured " in line]
    assert len(steps) == 10 and "pytest -m gpu" in steps[0] and "method=full" in steps[-1]
    assert "sparse_delta.py --device cuda" in steps[1] and "new_batch.py --device cuda" in steps[2]
    assert "framework footprint on cuda" in steps[3]
