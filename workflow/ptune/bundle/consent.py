"""The user's consent to what a served bundle's base would run: its Python code (a chatglm base) and pickled weights.

Serving (`ptune serve web|api --bundle DIR`, `ptune chat --bundle DIR`, `python -m ptune.bundle DIR`) loads whatever
base model the bundle names, and a bundle is easy to copy or download: a record inside it proves nothing, since whoever
made the folder wrote it. The decision is the user's own (`user_trusts`): the `--trust-remote-code` flag, or their
params (`fetch_weights.trust_remote_code: true`) when the base is the project's own models/base, which fetch_weights
fetched under those params. `require_consent` refuses without it, before any of the code is imported. What a folder
may hold at all is model/trust.py's (the backends check it again before they load).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .. import config
from ..errors import PtuneError
from ..model import trust
from ..paths import BASE

TRUST_FLAG = "--trust-remote-code"
ALLOW_PICKLE_FLAG = "--allow-pickle"


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
    config.check_declared(f"fetch_weights.{key}")  # in a stage's process (deploy's check): a key it declares
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
        modules = ", ".join(trust.remote_code_files(base)) or "its .py files"
    except (OSError, ValueError):
        modules = "its .py files"
    raise PtuneError(
        f"{what} names the base model {base}, whose Python code ({modules}) would run with your account's rights "
        f"(ChatGLM-6B's remote code); a record inside a folder is not your consent, since whoever made the folder "
        f"wrote it. Read the code, and pass {TRUST_FLAG} if you trust it (for the project's own models/base, "
        "fetch_weights.trust_remote_code: true in params.yaml is enough)"
    )
