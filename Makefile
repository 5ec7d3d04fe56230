# ocd: every target sets itself up (a venv in .venv with the CPU build of torch pinned first).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TASK   ?= mnist
CACHE  ?= data
BIN     = $(VENV)/bin
OCD     = $(BIN)/ocd
STAMP   = $(VENV)/.ocd-installed

.PHONY: setup base overfit train evaluate demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

base: setup  ## stage zero: train the base model
	$(OCD) base --task $(TASK) --cache-dir $(CACHE)

overfit: setup  ## stage one: per-sample overfitting into the Zarr record store
	$(OCD) overfit --task $(TASK) --cache-dir $(CACHE)

train: setup  ## stage two: train the conditional diffusion model
	$(OCD) train --task $(TASK) --cache-dir $(CACHE)

evaluate: setup  ## evaluate base, OCD, ensemble, oracle and ablations on the test split
	$(OCD) evaluate --task $(TASK) --cache-dir $(CACHE)

demo: setup  ## every stage on the default task, each only if its cache is missing
	$(OCD) run --task $(TASK) --cache-dir $(CACHE)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run_all.py

lint: setup
	$(BIN)/ruff check .

clean:  ## remove every cached artefact (keeps data/README.md)
	find $(CACHE) -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
