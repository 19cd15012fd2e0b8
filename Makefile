# llave-ds: `make demo` runs the offline demo, `make test` runs the test suite.
# Both create a local virtualenv (.venv) with pinned versions on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llave-ds-installed
# The CPU accelerator of DeepSpeed; harmless on GPU machines (only tests/demo use it).
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/llave-ds demo --out demo_out

test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider --timeout 900 -o faulthandler_timeout=900

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"

clean:
	rm -rf $(VENV) demo_out
