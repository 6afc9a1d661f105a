# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch keeps set-up to a minute; the package itself only asks for torch>=2.10.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: install test lint demo bench bench-dask bench-stream faults fixtures dist check-wheel clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml setup.py src/actfmt/_kernel.c | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,all]"
	$(BIN)/python -m compileall -q src/actfmt  # as pip does for a wheel: start-up never compiles actfmt
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/mypy

demo: install
	@bash scripts/demo.sh "$(BIN)" "$(DEMO_OUT)"

# BENCH_ARGS: e.g. "--splits seed,float32" (the float32 split too), "--only convert", "--repeat 3"
bench: install
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

bench-dask: install
	$(BIN)/python benchmarks/dask_scaling.py $(BENCH_ARGS)

bench-stream: install
	$(BIN)/python benchmarks/stream.py

faults: install
	$(BIN)/python benchmarks/faults.py

fixtures: install
	$(BIN)/python scripts/make_fixtures.py

# The sdist and two wheels, in dist/ (README: "Install it anywhere else"): this platform's, with the compiled
# statistics kernel, and a pure-Python one (ACTFMT_PURE=1: the numpy kernel) for any platform.
dist: install
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	ACTFMT_PURE=1 $(BIN)/python -m build --wheel --outdir dist .

# Build, install the wheel alone into a fresh venv outside the repository, run actfmt there (CI runs this).
check-wheel: install
	TORCH_SPEC="$(TORCH_SPEC)" bash scripts/check_wheel.sh "$(BIN)/python"

clean:
	rm -rf $(VENV) $(DEMO_OUT) build dist *.egg-info src/*.egg-info src/actfmt/*.so
