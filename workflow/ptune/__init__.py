"""ptune: a reproducible P-tuning v2 pipeline for GLM-family chat models."""

import sys

# pyproject.toml's requires-python. The code needs 3.11 (hashlib.file_digest, snakemake 9); 3.11.4 is the first
# 3.11 with tarfile's extraction filters and the security fixes around them. Checked here, where every entry point
# (the ptune command, the Snakefile, python -m) passes first, so that an older Python stops with this sentence
# rather than a traceback from wherever it first fails.
MIN_PYTHON = (3, 11, 4)
if sys.version_info < MIN_PYTHON:
    raise SystemExit(
        f"ptune needs Python {'.'.join(map(str, MIN_PYTHON))} or newer, and this is {sys.version.split()[0]} "
        f"({sys.executable}); create the environment with a newer one: `rm -rf .venv && PYTHON=python3.12 make setup`"
    )
