# The two commands of the README: `make run` (the default suite) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv run test bench clean

venv:
	@bash scripts/setup.sh

run: venv
	$(VENV)/bin/zobench run suites/smollm2.yaml

test: venv
	$(PY) -m pytest -q tests bench --benchmark-disable --durations=15

bench: venv
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=median,iqr,rounds
	$(PY) bench/zo_step.py --json results/bench/zo_step.json

clean:
	rm -rf $(VENV) .pytest_cache
