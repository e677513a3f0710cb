# Ciliary — the two commands a newcomer runs (as root, on Debian):
#   make demo   set-up, a lab of real kubelets with Ciliary installed by its Helm chart, and the demo
#   make test   set-up and the whole suite (lint, types, layering, unit, integration, e2e)
SHELL := /bin/bash
VENV  ?= $(CURDIR)/.venv
PY    := $(VENV)/bin/python
CILIARY := $(VENV)/bin/ciliary
PYTEST_ARGS ?=

.PHONY: setup demo demo-real-nodes conformance conformance-cyclonus test lint unit integration e2e lab-up lab-down clean bench

setup:
	@setup/setup.sh

# the Star Wars scene on real kubelets, Ciliary installed by its Helm chart (ciliary lab up --real-nodes)
demo: setup
	@$(PY) -m ciliary.lab.demo

# the former name of `make demo`
demo-real-nodes: demo

# the upstream e2e.test against a running real-node lab (ciliary lab up --real-nodes), one run per focus list
# (area): Netpol with Ciliary's enforcement; Services & co. and DNS with kube-proxy (~2 h in all); counts per area.
# The short list: make conformance FOCUS=e2e/conformance.txt. Each area's output: $(CONFORMANCE_LOG_DIR)/conformance-AREA.log
FOCUS ?= e2e/conformance/netpol.txt e2e/conformance/services.txt e2e/conformance/dns.txt
CONFORMANCE_LOG_DIR ?= /tmp
conformance: setup
	@$(PY) -m ciliary.lab.conformance $(foreach f,$(FOCUS),--focus-file $(f)) --log-dir $(CONFORMANCE_LOG_DIR)

# cyclonus's live `generate` run against a running real-node lab: the generator tags of
# e2e/conformance/cyclonus.txt (38 cases, ~20-40 min on the shared machine); prints passed/failed cases.
# Its output: $(CONFORMANCE_LOG_DIR)/conformance-cyclonus.log
conformance-cyclonus: setup
	@$(PY) -m ciliary.lab.cyclonus_live --log-dir $(CONFORMANCE_LOG_DIR)

lint: setup
	$(VENV)/bin/ruff check operator nodeagent e2e tests bench
	$(VENV)/bin/mypy -p ciliary.operator -p ciliary.cli -p ciliary.nodeagent -p ciliary.cni -p ciliary.lab
	$(VENV)/bin/lint-imports

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# the suite also runs the upstream e2e.test short list and `skaffold run`/`skaffold dev` on real nodes:
# both are built (cached by version) here rather than by every `make setup`; the 40 slowest tests are listed
# at the end (the suite must stay under 45 minutes on 2 cores)
test: setup lint
	@setup/build-node-tools.sh e2e skaffold
	$(PY) -m pytest tests e2e --durations=40 $(PYTEST_ARGS)

lab-up: setup
	$(CILIARY) lab up

lab-down:
	$(CILIARY) lab down

bench: setup
	for b in bench/bench_*.py; do $(PY) -m bench.$$(basename $$b .py) || exit 1; done

clean: lab-down
	rm -rf .lab .lab-* build *.egg-info
