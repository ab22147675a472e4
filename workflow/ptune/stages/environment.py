"""The environment a stage that loads models/base runs in: ChatGLM-6B's remote code needs its own (transformers 4.33,
model/legacy_env.py), so such a stage runs `python -m ptune.cli argv` again there. Imported by the runner for the
stages declared model_env only, and a code dep of those alone (pipeline/code.py)."""

from __future__ import annotations

from ..model import backends, legacy_env
from ..paths import BASE


def enter(argv: list[str]) -> None:
    if backends.needs_legacy_env(BASE) and not legacy_env.is_current():
        legacy_env.reexec("ptune.cli", argv)
