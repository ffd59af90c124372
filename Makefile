# medmodal: every target builds its own virtual environment with the pinned CPU torch (constraints.txt).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2

.PHONY: help install quickstart quickstart-fast test test-slow bench experiment-deepstaple lint clean

help:
	@echo "make quickstart   set up, then train + evaluate on the embedded synthetic phantom (report in runs/quickstart)"
	@echo "make test         set up, then run the default test suite (< 15 min on 2 CPU cores)"
	@echo "make test-slow    the slow tests (the full quickstart)"
	@echo "make bench        the benchmarks under benchmarks/ (figures go to docs/benchmarks.md by hand)"
	@echo "make experiment-deepstaple   DeepSTAPLE's experiments on the phantom (report in runs/deepstaple)"
	@echo "make lint         ruff"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# real chest X-ray JPEGs for the tests (data only: --no-deps, never imported, not a dependency of medmodal)
	$(BIN)/pip install --quiet --no-deps pneumonia-model-package==0.3.0
	@touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/medmodal quickstart --out runs/quickstart

quickstart-fast: install
	$(BIN)/medmodal quickstart --fast --out runs/quickstart-fast

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/data_pipeline.py --cases 8 --size 64 --patch 48 --iters 40 --repeats 5 --steps 20 --out .bench/data_pipeline
	$(BIN)/python benchmarks/train_step.py --patch 48 --batch 2 --steps 12 --repeats 3
	$(BIN)/python benchmarks/shaspec.py --patch 32 --batch 2 --iters 200 --eval-size 48 --repeats 3
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/staple.py --size 128 --raters 10 --labels 3 --repeats 3
	$(BIN)/python benchmarks/registration.py --size 48 --pairs 4 --repeats 2 --workers 0
	$(BIN)/python benchmarks/parallel_runs.py --recipe quickstart --steps 200 --runs 2 --repeats 2
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/m2dn.py --threads 2 --repeats 3
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/multimix.py --threads 2
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/pumit.py --threads 2

experiment-deepstaple: install
	$(BIN)/medmodal experiment deepstaple --out runs/deepstaple

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
