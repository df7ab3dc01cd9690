# The README's two commands. Both create .venv when it is missing and install the pinned set first.
PYTHON ?= python3
SEED ?= 0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test docs clean

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

## Diffusion-DPO on the toy model and toy preference data, on CPU, in a few minutes (`make quickstart SEED=1`: another seed).
quickstart: $(STAMP)
	$(BIN)/python -m lightning_pref.quickstart --seed $(SEED)

## Lint and format checks, the test suite with the docstring examples, then the docs site built strictly.
test: $(STAMP)
	$(BIN)/ruff check lightning_pref tests benchmarks examples
	$(BIN)/ruff format --check lightning_pref tests benchmarks examples
	$(BIN)/python -m pytest -q tests --doctest-modules lightning_pref --durations=20
	@# no --quiet: it silences the warnings that --strict counts, and the build then always passes
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir build/site

docs: $(STAMP)
	$(BIN)/python -m mkdocs serve

clean:
	rm -rf build outputs .pytest_cache
