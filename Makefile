# make test : fresh machine -> venv, pinned deps, CUDA extension built (required), ruff, pytest.
# make demo : the main job on the embedded default.
SHELL := /bin/bash
VENV ?= .venv
ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif
STAMP := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(VENV))/.slim-deps-stamp
SLIM_OPS_CUDA ?= ON
PYTEST_ARGS ?=

.PHONY: venv deps install lint test demo bench gpu-check clean

venv:
ifndef VIRTUAL_ENV
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
endif

$(STAMP): requirements-dev.txt | venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

deps: $(STAMP)

install: deps
	SLIM_OPS_CUDA=$(SLIM_OPS_CUDA) $(PY) -m pip install -q --no-build-isolation --no-deps -e .

lint: deps
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m slim_rl demo --overwrite  # the fixed demo job: replaces runs/demo (kept until the new SFT is done)

# Short CPU runs of the decode-step and compat benchmarks (JSON into benchmarks/results/cpu/); the full
# benchmarks and their options: see docs/benchmarks.md.
bench: install
	$(PY) benchmarks/bench_tau_budget.py --device cpu --reps 3 --no-compile
	$(PY) benchmarks/bench_compat.py --reps 2

# GPU evidence in one call (stages, budgets, archive: see benchmarks/gpu_check.sh); on a CPU:
# `make gpu-check ARGS=--dry-run`. Uses the venv's python when there is one (the GPU image has none).
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) bash benchmarks/gpu_check.sh $(ARGS)

clean:
	rm -rf build *.egg-info slim_ops/_C*.so
