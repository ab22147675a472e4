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

$(STAMP): pyproject.toml requirements/lock.txt scripts/setup-venv.sh
	scripts/setup-venv.sh $(VENV)
	touch $@

report: setup
	snakemake --cores 1 report

legacy: $(STAMP)
	$(VENV)/bin/python -m ptune.model.legacy_env ensure

# ruff (lint and format) and deptry (every import declared), configured in pyproject.toml; part of `make test`.
lint: $(STAMP)
	ruff check workflow tests bench scripts
	ruff format --check workflow tests bench scripts
	deptry workflow

test: $(STAMP) legacy lint
	pytest

# Everything, slow tests included.
test-all: $(STAMP) legacy
	pytest -m ""

# Every fault-injection case: each stage killed at the first, middle and last pass of each point, both front ends.
test-faults: $(STAMP)
	PTUNE_FAULT_CASES=all pytest -m faults tests/test_faults.py

# Regenerate the hashed lock, requirements/lock.txt, with pip-compile (after changing a range in pyproject.toml): the
# versions it holds are kept where they still fit. `make lock UPGRADE=gradio` moves one package (and what it needs)
# to its newest allowed version; UPGRADE="a b" several. scripts/lock.py then leaves out torch and ptune itself.
lock: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet "pip-tools>=7.4,<8"
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra test \
	  --no-emit-index-url --no-emit-find-links $(foreach p,$(UPGRADE),--upgrade-package $(p)) \
	  --output-file requirements/lock.txt pyproject.toml
	$(VENV)/bin/python scripts/lock.py requirements/lock.txt

clean-venv:
	rm -rf $(VENV) .venv-legacy
