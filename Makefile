# fxsight developer tasks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench bench-gpu clean

# Create the virtualenv and install pinned deps + fxsight (editable) once;
# re-run only when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -e .
	touch $@

$(VENV): $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m fxsight.experiments.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --doctest-modules tests fxsight

# Run every benchmark, store each section under perf/results/ and rewrite
# docs/performance.md from perf/performance.md.in (nnsight, where FXSIGHT_BENCH_NNSIGHT_PATH
# or FXSIGHT_BENCH_NNSIGHT_PYTHON names it, runs in a child process).
bench: $(STAMP)
	$(PY) -m perf --write

# On a machine with a CUDA device: the GPU benchmark only (perf/bench_gpu.py; its docstring
# gives the whole command for a GPU lease, with nnsight and the timeout it needs).
bench-gpu:
	$(PYTHON) -m perf --device cuda --write

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
