"""Stage fetch_weights: put a base model and its tokenizer in models/base/."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import atomic, backends, embedded_model
from .config import Params
from .errors import PtuneError

OUT = Path("models/base")
SOURCE_RECORD = "ptune_source.json"


def _copy_local(path: str, dest: Path) -> dict:
    src = Path(path).expanduser()
    if not path or not src.is_dir():
        raise PtuneError(f"fetch_weights.path: {path!r} is not a directory; point it at a transformers model "
                         "directory (config.json, weights, tokenizer files)")
    if not (src / "config.json").is_file():
        raise PtuneError(f"fetch_weights.path: {src} has no config.json; is it a transformers model directory?")
    shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
    return {"path": str(src)}


def run(params: Params) -> None:
    cfg = params.fetch_weights
    with atomic.atomic_dir(OUT) as tmp:
        if cfg.source == "embedded":
            if cfg.backend != backends.TRANSFORMERS:
                raise PtuneError(f"fetch_weights.backend: {cfg.backend!r} runs ChatGLM-6B's remote code, but the "
                                 "embedded model is a transformers-native GLM; set backend: transformers, or a source "
                                 "that gives a ChatGLM-6B model")
            facts = embedded_model.build(cfg.embedded, tmp)
        else:
            facts = _copy_local(cfg.path, tmp)
        # Later stages read the backend from this record (backends.name_of): they depend on models/base anyway.
        backends.check_model_dir(tmp, cfg.backend)
        atomic.write_json(tmp / SOURCE_RECORD, {"source": cfg.source, "backend": cfg.backend, **facts})
