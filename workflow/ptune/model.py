"""Load a base model and tokenizer the way a downloaded model is loaded: AutoModelForCausalLM / AutoTokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import PtuneError

log = logging.getLogger(__name__)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise PtuneError(f"{path}: no tokenizer here; run `ptune fetch_weights` (or `dvc repro fetch_weights`) first")
    return AutoTokenizer.from_pretrained(str(path))


def load_frozen(path: str | Path, dev: torch.device | None = None, dtype: torch.dtype = torch.float32):
    """The base model in eval mode with every parameter frozen (P-tuning trains only the prefix)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise PtuneError(f"{path}: no config.json here; run `ptune fetch_weights` (or `dvc repro fetch_weights`) first")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    return model.to(dev or device())


def assert_frozen(model, prefix=None) -> int:
    """Raise if any base parameter would train; returns the base's parameter count. `prefix`: a module inside the
    model that is meant to train (ChatGLM-6B's built-in prefix encoder)."""
    own = {id(p) for p in prefix.parameters()} if prefix is not None else set()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]
    if trainable:
        raise RuntimeError(f"base model parameters are trainable but must be frozen: {trainable[:3]}")
    return sum(p.numel() for p in model.parameters() if id(p) not in own)
