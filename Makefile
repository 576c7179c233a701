# The two commands of a new user: `make run` (the main example, no cluster) and `make test`.
# Both set up .venv on first use from this project's own files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# mypy sees the package as it is installed (kubeforge.operator, kubeforge.trainer) through a tree of
# links: operator/ and trainer/ are mapped by setuptools, which mypy cannot follow.
TYPECHECK := build/typecheck

# `make test` runs the suite three times: against the API server emulator; its cluster tests against
# the real control plane of ../shared/realk8s; and tests/node/ on that control plane's real node
# (kubelet, containerd), in kubeforge's own images, built first (the suite starts and stops both; skipped,
# saying so, where that folder is missing). Its last line gives the counts per target.
# `make test-node` is the third alone: the README's kind path on the real node. FAULT_SIZE=full for
# the fault counts of docs/reliability.md.
RESULTS := build/test-results
FAULT_SIZE ?= ci

.PHONY: run test test-node lint test-deps

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

# Prometheus and promtool, for tests/packaging/test_prometheus.py and tests/packaging/test_alerts.py: installed with apt
# (root or sudo), or the one command that does it is printed before any test runs.
test-deps:
	.ci/install-test-deps

test: test-deps lint
	rm -rf $(RESULTS)
	status=0; \
	$(BIN)/pytest --junitxml=$(RESULTS)/emulator.xml || status=$$?; \
	$(BIN)/pytest --cluster=real --junitxml=$(RESULTS)/real.xml || status=$$?; \
	$(BIN)/pytest --cluster=node --fault-size=$(FAULT_SIZE) --junitxml=$(RESULTS)/node.xml || status=$$?; \
	$(BIN)/python .ci/test-summary.py $(RESULTS)/emulator.xml $(RESULTS)/real.xml $(RESULTS)/node.xml; \
	exit $$status

test-node: test-deps $(BIN)/kubeforge
	$(BIN)/pytest --cluster=node --fault-size=$(FAULT_SIZE) -s
