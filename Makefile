# llnm-fl: two commands on a fresh machine.
#   make demo   set up .venv, generate the synthetic 7-site consortium if absent, run the federated demo
#   make test   set up .venv, run the test suite (the slow end-to-end runs included, as CI does; not the faults tier)
#   make test-fast   the same without the tests marked slow (real federations): a quick check while editing
#   make test-faults the real-process fault scenarios (SuperLink killed mid-round, a stalled site), minutes each
#   make docs   regenerate the generated pages (docs/config.md: every configuration key; docs/results.md and the
#               README's results table: every figure of benchmarks/results/)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data/consortium
DEMO_PATIENTS ?= 700
DEMO_SEED ?= 7
# Two pytest workers, one test module each at a time (pytest-xdist, --dist loadfile: a module's fixtures are
# built once). The suite waits on child processes (SuperLink, SuperNodes, Ray) much of the time, so two workers
# on two cores took a fresh clone's suite from 506 s to 365 s. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Bytecode is written on first import rather than for every installed file at install time (--no-compile
# below): pip compiling torch, Ray, transformers and the rest took about a minute of the 2-core machine's
# fresh-clone `make test`, for modules the suite mostly never imports.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-fast test-faults lint venv clean bench docs

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -e '.[dev]'
	touch $(STAMP)

$(DATA)/consortium.json: | $(STAMP)
	$(BIN)/llnm-synth --out $(DATA) --sites 7 --patients $(DEMO_PATIENTS) --seed $(DEMO_SEED)

demo: $(STAMP) $(DATA)/consortium.json
	$(BIN)/python -m fl_research.demo --config configs/demo.yaml --data $(DATA)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not faults" $(PARALLEL)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not faults" $(PARALLEL)

test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults

lint: $(STAMP)
	$(BIN)/ruff check .

# One line per generator, each rewriting its page under docs/ (tests/test_docs.py checks that they are current).
docs: $(STAMP)
	$(BIN)/python docs/make_config_reference.py
	$(BIN)/python docs/make_results_page.py

clean:
	rm -rf $(VENV) runs data .pytest_cache .ruff_cache
