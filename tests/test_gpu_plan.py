"""`make gpu-plan` on a CPU machine: what `make gpu-check` would run on a GPU, and that its first steps (the
whole 7B cells, then the GPU tests) fit its 9 minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the plan is checked on CPU machines; a GPU runs it")
def test_gpu_check_plans_the_whole_7b_cells_first_within_its_budget(tmp_path):
    """`make gpu-plan`: the steps of `make gpu-check` and their time plan, without a GPU."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "scripts" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    head = done.stdout.splitlines()[0]
    budget = float(head.split(" s budget")[0].rsplit(" ", 1)[1])
    assert budget <= 540, head
    steps = [line for line in done.stdout.splitlines()[1:] if " planned " in line or " measured " in line]
    assert len(steps) == 15 and "method=full" in steps[-1]
    assert "suites/llama7b.yaml --only quant=nf4,method=sensitive" in steps[0]
    assert "suites/llama7b-cuda.yaml" in steps[1] and "pytest -m gpu" in steps[2]
    assert sum(float(line.split()[0]) for line in steps[:3]) <= budget  # the whole cells and the tests fit
    assert "new_batch.py --device cuda" in steps[3]  # the open question first: what a new shape costs
    assert "mask_memory.py --device cuda" in steps[4] and "topk_memory.py --device cuda" in steps[5]
    assert "sparse_pass_ops.py --device cuda" in steps[6] and "sparse_delta.py --device cuda" in steps[7]
    assert "framework footprint on cuda" in steps[8]
