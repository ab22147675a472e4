"""Stage fetch_weights: put a base model and its tokenizer in models/base/."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import atomic, embedded_model
from .config import Params
from .errors import PtuneError
from .provenance import SOURCE_RECORD

OUT = Path("models/base")


def _copy_local(path: str, dest: Path) -> dict:
    src = Path(path).expanduser()
    if not path or not src.is_dir():
        raise PtuneError(f"fetch_weights.path: {path!r} is not a directory; point it at a transformers model "
                         "directory (config.json, weights, tokenizer files)")
    if not (src / "config.json").is_file():
        raise PtuneError(f"fetch_weights.path: {src} has no config.json; is it a transformers model directory?")
    shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
    check_tokenizer_fits(dest)
    return {"path": str(src)}


def check_tokenizer_fits(model_dir: Path) -> None:
    """A tokenizer from another model hands out ids past the embedding table: an index error deep in torch later."""
    from transformers import AutoConfig

    from .model import load_tokenizer

    vocab = getattr(AutoConfig.from_pretrained(str(model_dir)), "vocab_size", None)
    n_tokens = len(load_tokenizer(model_dir))
    if isinstance(vocab, int) and n_tokens > vocab:
        raise PtuneError(f"{model_dir}: the tokenizer has {n_tokens} tokens but the model's config.json says "
                         f"vocab_size {vocab}; the tokenizer belongs to another model. Fetch the model and its "
                         "own tokenizer from the same repository and revision")


def run(params: Params) -> None:
    cfg = params.fetch_weights
    with atomic.atomic_dir(OUT) as tmp:
        if cfg.source == "embedded":
            facts = embedded_model.build(cfg.embedded, tmp)
        else:
            facts = _copy_local(cfg.path, tmp)
        atomic.write_json(tmp / SOURCE_RECORD, {"source": cfg.source, **facts})
