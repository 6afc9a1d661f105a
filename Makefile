# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch keeps set-up to a minute; the package itself only asks for torch>=2.10.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: install test lint demo bench fixtures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,all]"
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

bench: install
	$(BIN)/python benchmarks/run.py

fixtures: install
	$(BIN)/python scripts/make_fixtures.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info
