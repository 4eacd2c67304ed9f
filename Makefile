# slimtorch: `make demo` (the main job) and `make test` (the tests) do all the set-up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Real data for the tests and benchmarks; override with SLIMTORCH_DATA=/path make test.
SLIMTORCH_DATA ?= $(abspath ../shared/data)
export SLIMTORCH_DATA
PYTEST_ARGS ?=

.PHONY: demo test test-all lint typecheck clean venv

$(VENV)/.stamp-%: pyproject.toml constraints.txt scripts/constraints.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) scripts/constraints.py > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[$*]'
	touch $@

venv: $(VENV)/.stamp-dev

demo: $(VENV)/.stamp-demo
	bash scripts/demo.sh $(PY)

test: $(VENV)/.stamp-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything, the `slow` and `gpu` tests included (gpu tests still need a GPU to run).
test-all: $(VENV)/.stamp-dev
	$(PY) -m pytest -q --run-slow --run-gpu $(PYTEST_ARGS)

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

typecheck: $(VENV)/.stamp-dev
	$(VENV)/bin/mypy src

clean:
	rm -rf $(VENV) runs .pytest_cache
