# Set-up and checks on a fresh machine (Python >= 3.10; everything goes into .venv):
#   make demo        runs FMTT on the bundled digits model (CPU, no downloads); writes fmtt_out/
#   make test        lint (ruff) and the whole test suite, about 10 minutes on 2 cores; CI runs exactly this
#   make test-fast   lint and the quick tests (about 3 minutes on 2 cores): for development
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

# The test environment pins torch (the pack itself never does). Any pip requirements work, e.g.
#   make demo TORCH_PIN="torch torchvision"   or   make demo TORCH_PIN="torch==2.5.1 torchvision==0.20.1"
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# Where torch comes from. auto: on Linux without an NVIDIA GPU, PyTorch's CPU-only build when its index
# answers within TORCH_PROBE_TIMEOUT seconds (a few hundred MB), else PyPI's build (on Linux the CUDA one,
# about 6 GB); cpu / pypi: that one, no probe. scripts/torch_index.py decides and says which it took.
TORCH_BUILD ?= auto
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PROBE_TIMEOUT ?= 5

# The venv records the torch choice it was built with; a different TORCH_PIN or TORCH_BUILD rebuilds it.
TORCH_CHOICE := $(TORCH_PIN) [$(TORCH_BUILD)]
TORCH_STAMP := $(VENV)/.torch-choice
ifneq ($(shell cat $(TORCH_STAMP) 2>/dev/null),$(TORCH_CHOICE))
$(TORCH_STAMP): FORCE
endif

$(TORCH_STAMP):
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	index="$$($(PY) scripts/torch_index.py --build $(TORCH_BUILD) --index $(TORCH_CPU_INDEX) \
	    --timeout $(TORCH_PROBE_TIMEOUT))"; \
	$(BIN)/pip install -q $$index $(TORCH_PIN) || { [ -n "$$index" ] && \
	    echo "torch: the CPU index failed for '$(TORCH_PIN)'; installing PyPI's build instead" && \
	    $(BIN)/pip install -q $(TORCH_PIN); }
	echo '$(TORCH_CHOICE)' > $@

$(BIN)/.ready: pyproject.toml $(TORCH_STAMP)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.ready

demo: $(BIN)/.ready
	$(BIN)/fmtt demo --out fmtt_out

lint: $(BIN)/.ready
	$(BIN)/ruff check .

# The duration goes on the last line, after pytest's summary.
test: lint
	@start=$$(date +%s); $(BIN)/pytest; rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s (make test-fast runs the quick part)"; exit $$rc

# Leaves out the statistical tests marked slow, the multi-process (torch.distributed) tests and a few long
# single tests; CI runs them all through `make test`.
FAST_SKIP := tests/test_distributed_collectives.py tests/test_distributed_sampler.py tests/test_distributed_cli.py \
	tests/test_bench_distributed.py tests/test_core_sde_steps.py::test_sharded \
	tests/test_core_sde_steps.py::test_2m_base_chain_beats_euler tests/test_core_hard_cases.py::test_a_jump_off \
	tests/test_core_hard_cases.py::test_steep_gradient_case tests/test_demo_models.py::test_training_script_is_deterministic
test-fast: lint
	@start=$$(date +%s); $(BIN)/pytest -m "not slow" $(addprefix --deselect=,$(FAST_SKIP)); rc=$$?; \
	echo "make test-fast: $$(( $$(date +%s) - start )) s (make test runs everything)"; exit $$rc

FORCE:

.PHONY: venv demo lint test test-fast FORCE
