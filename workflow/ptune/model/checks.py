"""Checks on a base model directory shared by both backends: it is there, and a prefix belongs to it.

No torch or transformers here: the legacy environment (transformers 4.33) imports this as well.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import PtuneError


def require_config(base: Path) -> None:
    """Fail, saying how to get one, where `base` holds no model (no config.json)."""
    if not (Path(base) / "config.json").is_file():
        raise PtuneError(f"{base}: no config.json here; run `ptune fetch_weights` (or `dvc repro fetch_weights`) first")


def config_sha256(config, keys: Iterable[str]) -> str:
    """A stable fingerprint of a base model's architecture (the config values of `keys`; each backend names the
    keys its architecture has), to refuse loading a prefix onto another base."""
    shape = {k: getattr(config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()


def require_same_base(prefix_dir: Path, trained_on: str | None, recorded: str, loaded: str) -> None:
    """Refuse a prefix whose recorded base fingerprint is not the loaded base's."""
    if recorded != loaded:
        raise PtuneError(
            f"{prefix_dir}: this prefix was trained on base {trained_on!r} (config sha256 "
            f"{recorded[:12]}), but the loaded base has config sha256 {loaded[:12]}; load it onto the "
            "base it was trained on, or retrain it"
        )


# Where a model's config states its context window: transformers' models, and ChatGLM-6B's remote code (seq_length,
# max_sequence_length) name it differently.
CONTEXT_KEYS = ("max_position_embeddings", "seq_length", "max_sequence_length", "n_positions")


def context_window(config) -> tuple[str, int] | None:
    """(the config key, the longest sequence the model takes), from a config object or a config.json dict; None
    where the config states none."""
    for key in CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int):
            return key, value
    return None


def context_length(config, default: int | None = 2048) -> int | None:
    """The longest sequence the model takes; `default` where its config does not say."""
    found = context_window(config)
    return found[1] if found else default
