# The two commands of the README: `make report` (set up, then run the pipeline) and `make test`.
# ChatGLM-6B's remote code runs in a second environment, .venv-legacy (workflow/ptune/model/legacy_env.py): `setup` and
# `report` create it when params.yaml selects fetch_weights.backend chatglm, `test` always (its tests use it).
VENV ?= .venv
STAMP := $(VENV)/.ptune-installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Tests and runs never report usage or check for updates over the network.
export DVC_NO_ANALYTICS := 1

.PHONY: setup legacy report lint test test-all test-faults bench lock clean-venv

setup: $(STAMP)
	$(VENV)/bin/python -m ptune.model.legacy_env ensure --if-needed params.yaml

$(STAMP): pyproject.toml requirements/constraints.txt scripts/setup-venv.sh
	scripts/setup-venv.sh $(VENV)
	touch $@

report: setup
	snakemake --cores 1 report

legacy: $(STAMP)
	$(VENV)/bin/python -m ptune.model.legacy_env ensure

# ruff (lint and format) and deptry (every import declared), configured in pyproject.toml; part of `make test`.
lint: $(STAMP)
	ruff check workflow tests bench
	ruff format --check workflow tests bench
	deptry workflow

test: $(STAMP) legacy lint
	pytest

# Everything, slow tests included.
test-all: $(STAMP) legacy
	pytest -m ""

# Every fault-injection case: each stage killed at the first, middle and last pass of each point, both front ends.
test-faults: $(STAMP)
	PTUNE_FAULT_CASES=all pytest -m faults tests/test_faults.py

# Regenerate the lock from the current venv (after changing dependency ranges in pyproject.toml).
lock: $(STAMP)
	$(VENV)/bin/python -m pip freeze --exclude-editable \
	  | grep -viE '^(torch|triton|nvidia-|ptune)([=<> ]|$$)' \
	  | sed '1i # Exact versions for reproducible installs (`make lock` regenerates it). torch is chosen per machine\n# by scripts/setup-venv.sh and is deliberately not pinned here.' \
	  > requirements/constraints.txt

clean-venv:
	rm -rf $(VENV) .venv-legacy
