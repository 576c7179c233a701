# The two commands of a new user: `make run` (the main example, no cluster) and `make test`.
# Both set up .venv on first use from this project's own files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# mypy sees the package as it is installed (kubeforge.operator, kubeforge.trainer) through a tree of
# links: operator/ and trainer/ are mapped by setuptools, which mypy cannot follow.
TYPECHECK := build/typecheck

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
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/kubeforge
	ln -s $(CURDIR)/kubeforge/*.py $(TYPECHECK)/kubeforge/
	ln -s $(CURDIR)/operator $(TYPECHECK)/kubeforge/operator
	ln -s $(CURDIR)/trainer $(TYPECHECK)/kubeforge/trainer
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml

test: lint
	$(BIN)/pytest
