# Everything a fresh machine needs: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PREFECT_LOGGING_EXTRA_LOGGERS ?= ipr_core

.PHONY: setup demo test test-fast bench clean-venv

setup: $(STAMP)

# CPU torch first, from the file pip finds on this machine, or pip pulls a
# multi-GB CUDA build as a dependency of transformers/trl.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	# PATH: fast-downward-textworld (ALFWorld's planner) builds from source and
	# runs `python build.py`, which must be this venv's python.
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PIP) install -q -e ".[all,dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ipr run --config configs/demo.yaml

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/envs.py && $(PY) bench/rollouts.py && $(PY) bench/training.py && $(PY) bench/orchestration.py && $(PY) bench/ipr_cost.py && $(PY) bench/contention.py && $(PY) bench/serving.py

clean-venv:
	rm -rf $(VENV)
