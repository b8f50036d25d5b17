# Two entry points that set up a fresh machine themselves:
#   make demo  - venv, install, fetch the default real models, short benchmark on the default preset
#   make test  - venv, install with test extras, the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specdec-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/specdec bench --config qwen-coder-pair --limit 6 --max-new-tokens 64 \
		--drafter draft-model-tree --baselines plain,hf-assisted --output results/demo

bench: $(STAMP)
	$(VENV)/bin/specdec bench --config qwen-coder-pair --output results/latest

clean:
	rm -rf $(VENV) results .pytest_cache
