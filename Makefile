# The two commands of the README: `make dev` (install, then a first run) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

BENCH_ARGS ?=

.PHONY: install dev test bench bench-quick lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' --config-settings editable_mode=compat  # the checkout on sys.path: a clone folder named phibroker cannot shadow the package
	touch $@

dev: install
	$(BIN)/phibroker dev

test: install
	$(BIN)/pytest -n 3  # three at a time: most tests wait on real processes, so even two cores keep up

# the benchmark also measures Celery beside phibroker: the `[bench]` extra
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev,bench]' --config-settings editable_mode=compat
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-quick: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks --quick

lint: install
	$(BIN)/ruff check phibroker workers tests benchmarks
	$(BIN)/ruff format --check phibroker workers tests benchmarks
	$(BIN)/mypy phibroker workers

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
