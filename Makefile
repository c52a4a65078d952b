# Two commands do all set-up on a fresh machine:
#   make demo   - runs FMTT on the bundled digits model (CPU, no downloads)
#   make test   - lints (ruff) and runs the test suite; CI runs exactly this
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The test environment pins torch (the pack itself never does). From PyPI on Linux this is the CUDA
# build (several GB of CUDA libraries, unused on a CPU). To use another torch, override it, e.g.
#   make demo TORCH_PIN="torch torchvision"   or   make demo TORCH_PIN="torch==2.5.1 torchvision==0.20.1"
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

$(BIN)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.ready

demo: $(BIN)/.ready
	$(BIN)/fmtt demo --out fmtt_out

lint: $(BIN)/.ready
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

.PHONY: venv demo lint test
