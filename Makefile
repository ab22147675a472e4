# The two commands of the README: `make report` (set up, then run the pipeline) and `make test`.
VENV ?= .venv
STAMP := $(VENV)/.ptune-installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Tests and runs never report usage or check for updates over the network.
export DVC_NO_ANALYTICS := 1

.PHONY: setup report test test-all test-faults bench lock clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt scripts/setup-venv.sh
	scripts/setup-venv.sh $(VENV)
	touch $@

report: $(STAMP)
	snakemake --cores 1 report

test: $(STAMP)
	pytest

# Everything, slow tests included.
test-all: $(STAMP)
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
	rm -rf $(VENV)
