# Quick start: `make bench` (installs, then runs `fastft bench` on its quick suite) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench info

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q torch==2.13.0   # the CPU build; installed first so nothing pulls a CUDA torch
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

install: $(STAMP)

# Triton kernels run on CPU under the interpreter, which must be enabled before triton is imported: own process.
test: install
	$(PY) -m pytest -q tests --ignore=tests/triton
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/triton

bench: install
	$(VENV)/bin/fastft bench

info: install
	$(VENV)/bin/fastft info
