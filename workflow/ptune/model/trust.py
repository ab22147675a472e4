"""What a fetched model folder may make ptune run: Python code shipped with the weights, and pickles.

Both can run arbitrary code on this machine, so both are off unless params.yaml says otherwise:
- `fetch_weights.trust_remote_code`: the chatglm backend imports ChatGLM-6B's modeling/tokenization code from
  models/base. The transformers backend never runs such code, whatever this says.
- `fetch_weights.allow_pickle`: weights in pickle formats (pytorch_model*.bin, *.pt, ...), which torch unpickles.
  Without it a folder that has safetensors weights keeps only those (the pickled copies are left out of
  models/base, which also halves its size when a repository ships both), and a folder with pickles alone is refused.

fetch_weights checks the folder and records both settings in models/base/ptune_source.json; the code that would run
remote code reads the record again (require_remote_code), so a models/base from before the check is not trusted.

Serving (`ptune serve web|api --bundle DIR`, `ptune chat --bundle DIR`, `python -m ptune.bundle DIR`) loads whatever
base model the bundle names, and a bundle is easy to copy or download: a record inside it proves nothing, since whoever
made the folder wrote it. There the decision is the user's own (`user_trusts`): the `--trust-remote-code` flag, or
their params (`fetch_weights.trust_remote_code: true`) when the base is the project's own models/base, which
fetch_weights fetched under those params. `require_consent` refuses without it, before any of the code is imported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from ..errors import PtuneError
from ..paths import BASE, SOURCE_RECORD

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TRUST_FLAG = "--trust-remote-code"


def _weights(folder: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".git" not in p.relative_to(folder).parts)
    return ([p for p in files if p.suffix == ".safetensors"], [p for p in files if p.suffix in PICKLE_SUFFIXES])


def _remote_code(folder: Path) -> list[str]:
    """The Python modules config.json's auto_map points at (what trust_remote_code would import)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    # A value is "module.Class", or a [slow, fast] pair of them in which either may be null.
    refs = [r for ref in config.get("auto_map", {}).values() for r in (ref if isinstance(ref, list) else [ref])]
    return sorted({r.split(".")[0] + ".py" for r in refs if isinstance(r, str)})


def check_folder(folder: Path, *, backend: str, trust_remote_code: bool, allow_pickle: bool, what: str) -> None:
    """Refuse what params do not allow; drop pickled duplicates of safetensors weights. `folder` is fetch_weights'
    temporary output, so removing files there loses nothing of the source."""
    if backend == "chatglm" and not trust_remote_code:
        modules = ", ".join(_remote_code(folder)) or "the model's .py files"
        raise PtuneError(
            f"fetch_weights.trust_remote_code is false, but backend chatglm runs the Python code that "
            f"{what} ships ({modules}), with your account's rights. Read it, and set "
            "fetch_weights.trust_remote_code: true in params.yaml if you trust it"
        )
    safe, pickles = _weights(folder)
    if not pickles or allow_pickle:
        return
    names = ", ".join(str(p.relative_to(folder)) for p in pickles[:4]) + (" ..." if len(pickles) > 4 else "")
    if not safe:
        raise PtuneError(
            f"{what} has its weights only as pickles ({names}); unpickling can run code. Set "
            "fetch_weights.allow_pickle: true in params.yaml if you trust where they come from, or use "
            "a revision with safetensors weights"
        )
    for path in pickles:
        path.unlink()
    log.info(
        "left out %d pickle file(s) of %s (%s): its safetensors weights are used; fetch_weights.allow_pickle: "
        "true keeps them",
        len(pickles),
        what,
        names,
    )


def record(trust_remote_code: bool, allow_pickle: bool) -> dict:
    """What fetch_weights writes into ptune_source.json."""
    return {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}


def require_remote_code(base: Path) -> None:
    """Before importing code from `base`: fetch_weights must have been told to trust it."""
    path = base / SOURCE_RECORD
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if recorded.get("trust_remote_code") is not True:
        raise PtuneError(
            f"{base}: its Python code would run, but {path} does not record "
            "fetch_weights.trust_remote_code: true; set it in params.yaml if you trust the model, and "
            "rerun fetch_weights (dvc repro / snakemake do)"
        )


def user_trusts(base: str | Path, flag: bool, params: str | Path | None) -> bool:
    """Whether the user consents to running the Python code of `base` when serving: their `flag`, or their params
    file's fetch_weights.trust_remote_code when `base` is the project's own models/base (what fetch_weights fetched
    under that consent). Never a record inside `base` or a bundle: whoever made the folder wrote those."""
    return flag or params_consent(base, params, "trust_remote_code")


def params_consent(base: str | Path, params: str | Path | None, key: str) -> bool:
    """Whether the user's params file says fetch_weights.`key`: true, counted only when `base` is the project's own
    models/base (what fetch_weights fetched under those params)."""
    if params is None or Path(base).resolve() != BASE.resolve():
        return False
    try:
        raw = yaml.safe_load(Path(params).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    section = raw.get("fetch_weights") if isinstance(raw, dict) else None
    return isinstance(section, dict) and section.get(key) is True


def require_consent(base: Path, consent: bool, what: str) -> None:
    """Before serving a base whose Python code would run (chatglm backend): the user's consent (user_trusts)."""
    if consent:
        return
    try:
        modules = ", ".join(_remote_code(base)) or "its .py files"
    except (OSError, ValueError):
        modules = "its .py files"
    raise PtuneError(
        f"{what} names the base model {base}, whose Python code ({modules}) would run with your account's rights "
        f"(ChatGLM-6B's remote code); a record inside a folder is not your consent, since whoever made the folder "
        f"wrote it. Read the code, and pass {TRUST_FLAG} if you trust it (for the project's own models/base, "
        "fetch_weights.trust_remote_code: true in params.yaml is enough)"
    )
