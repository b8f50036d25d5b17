# Two entry points that set up a fresh machine themselves:
#   make demo  - venv, install, fetch the default real models, short benchmark on the default preset
#   make test  - venv, install with test extras, the whole test suite
# Every install goes through constraints.txt (the exact versions the suite passed with), build dependencies
# included (PIP_CONSTRAINT reaches pip's isolated build environments too).
# Other targets: make test-latest (fresh venv, newest versions pyproject allows, whole suite), make wheel-smoke
# (build the wheel, install it outside the checkout, run the CLI on a tiny model), make lock (refresh the lock).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specdec-installed
CONSTRAINTS := $(CURDIR)/constraints.txt
PIP := PIP_CONSTRAINT=$(CONSTRAINTS) $(PY) -m pip
LATEST := .venv-latest
TORCH := torch==2.13.0

.PHONY: demo test bench install llamacpp test-latest wheel-smoke lock clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[test,bench,serve]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# The default preset on the CPU fast path (weights auto: the GGUF files' Q4_K / Q6_K tensors on the native kernels):
# plain decoding, llama.cpp on the same GGUF file when installed (make llamacpp), the draft-model defaults and
# prompt lookup, in one table.
DEMO_BASELINES = plain$(shell $(PY) -c "import llama_cpp" 2>/dev/null && echo ",llama-cpp")
demo: $(STAMP)
	$(VENV)/bin/specdec bench --config qwen-coder-pair --limit 6 --max-new-tokens 64 \
		--drafter draft-model-tree --drafter prompt-lookup-auto --baselines $(DEMO_BASELINES) --output results/demo

bench: $(STAMP)
	$(VENV)/bin/specdec bench --config qwen-coder-pair --output results/latest

# llama.cpp for the llama-cpp benchmark baselines, built from PyPI source (2.5 minutes on a 2-vCPU Zen 5, about 6
# on a 2-vCPU Intel VM) with the CPU's own instruction set but no AMX: some VMs advertise AMX that the OS does not
# enable (docs/benchmarks.md).
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
llamacpp: $(STAMP)
	CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" \
		$(PIP) install --quiet -e ".[test,bench,serve,llamacpp]"

# A fresh venv with the newest versions pyproject.toml allows (no lock), then the whole suite: run it whenever the
# registries may have moved. Prints the versions it got.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet "torch>=2.13,<2.14"
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test,bench,serve]"
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|tokenizers|accelerate|gguf|numpy|safetensors|huggingface.hub|matplotlib|pytest) "
	$(LATEST)/bin/python -m pytest

# The wheel as a user gets it: built here, installed into a fresh venv outside the checkout, run from outside it.
wheel-smoke: $(STAMP)
	bash .ci/wheel_smoke.sh $(PY) $(CONSTRAINTS)

# Rewrite constraints.txt from the test venv (after changing pyproject.toml and passing make test).
lock: $(STAMP)
	$(PY) -m pip freeze --all --exclude-editable | sed 's/+cpu$$//' | grep -v '^specdec' > constraints.body
	head -4 constraints.txt > constraints.head && cat constraints.head constraints.body > constraints.txt
	rm -f constraints.head constraints.body

clean:
	rm -rf $(VENV) $(LATEST) results .pytest_cache dist build
