# The two commands of the README: `make run` (the default suite) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv run lint test test-all bench gpu-bundle gpu-plan gpu-check clean

venv:
	@bash scripts/setup.sh

run: venv
	$(VENV)/bin/zobench run suites/smollm2.yaml

# lint: ruff (pyflakes, pycodestyle, isort, imports at the top of the module; pyproject.toml), first in CI.
lint: venv
	$(VENV)/bin/ruff check .

# test: what CI runs (about 9 minutes on 2 cores; .ci/run whole, install and smoke suite included, about 13).
# test-all adds the tests marked slow: whole suites, fault injection on Ray, the estimator's held-out cells
# (minutes each); run it when touching those parts.
test: venv
	$(PY) -m pytest -q tests bench --benchmark-disable --durations=15 -m "not slow"

test-all: venv
	$(PY) -m pytest -q tests bench --benchmark-disable --durations=15

bench: venv
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=median,iqr,rounds
	$(PY) bench/zo_step.py --json results/bench/zo_step.json
	$(PY) bench/quzo_passes.py --json results/bench/quzo_passes.json

# GPU nodes: the node's own Python and packages, plus gpu-bundle/ (make gpu-bundle, on a machine with an
# index). gpu-plan prints what gpu-check runs and its time plan, on any machine.
GPU_PY ?= python3

gpu-bundle: venv
	@bash scripts/gpu_bundle.sh

gpu-plan:
	$(GPU_PY) scripts/gpu_check.py --dry-run

gpu-check:
	$(GPU_PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache
