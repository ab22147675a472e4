"""The prompt builder of a base model: data/prompts.py builds prompts from what it is handed (a tokenizer and a
backend), and this finds both for the base in a folder (data does not import model)."""

from __future__ import annotations

from pathlib import Path

from ..data.prompts import Prompter, format_for
from . import backends


def for_base(cfg, base: Path) -> Prompter:
    """The prompt builder of the preprocess section (PreprocessConfig) for the base model in `base`: what preprocess
    builds data with, evaluate stops on and deploy writes into the bundle."""
    backend = backends.for_base(base)
    tokenizer = backend.load_tokenizer(base)
    return Prompter(format_for(cfg, tokenizer, backend.chat_templates), tokenizer, backend)
