# One entry for set-up, the main job, tests and benchmarks.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first and pinned: on this kind of machine pip finds the
# CPU wheel on disk; elsewhere PyPI's Linux wheel is the CUDA build. Set
# TORCH_SPEC (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128")
# to choose another build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup quickstart train test bench clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The main job: train the `mini` preset on the embedded Shakespeare corpus.
quickstart: setup
	$(VENV)/bin/gptdist train --local

train: quickstart

test: setup
	$(PY) -m pytest -q --durations=40 tests

bench: setup
	$(PY) -m bench --quick

clean-runs:
	rm -rf runs data
