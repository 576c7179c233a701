# The two commands of a new user: `make run` (the main example, no cluster) and `make test`.
# Both set up .venv on first use from this project's own files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint

$(BIN)/kubeforge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU torch wheel first, pinned: the trainer extra's range then installs nothing bigger.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[trainer,dev]'
	touch $@

run: $(BIN)/kubeforge
	$(BIN)/kubeforge run examples/pipeline.yaml

lint: $(BIN)/kubeforge
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest
