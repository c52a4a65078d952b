# Two commands do all set-up on a fresh machine:
#   make demo   - runs FMTT on the bundled digits model (CPU, no downloads)
#   make test   - runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The test environment pins torch (the pack itself never does).
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

test: $(BIN)/.ready
	$(BIN)/pytest

.PHONY: venv demo test
