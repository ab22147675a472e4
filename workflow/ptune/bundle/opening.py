"""Opening a deploy bundle for serving, in the one order every server and `python -m ptune.bundle` follow:

1. `switch_environment`, before any model code: a bundle whose base runs ChatGLM-6B's Python code needs the user's
   consent (bundle/consent.py), checked before the switch, which may build the legacy environment (a pip install):
   a folder's own record must not make ptune install anything, let alone run the folder's code; then the process
   re-executes itself in that environment.
2. `open_bundle`: bundle.json read and checked, the base found (downloaded if need be) and its weights checked
   against the bundle's record (bundle/origin.py), once, with the user's --base and consent; loading
   (bundle/loader.py, the serving engine) uses what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PtuneError
from ..model import backends, legacy_env
from . import consent, origin
from .manifest import read_manifest


def served_base(directory: str | Path, override: str | Path | None) -> tuple[Path | None, bool]:
    """The base a bundle names, where it is on this machine without a download (None where it must be fetched or the
    bundle is unreadable: opening it then fetches it, or says what is wrong), and whether it runs ChatGLM-6B's code."""
    try:
        chatglm = read_manifest(directory).get("backend") == backends.CHATGLM
    except (PtuneError, OSError, ValueError, AttributeError):  # unreadable: open_bundle names the problem
        return None, False
    return origin.local_base(directory, override), chatglm


def switch_environment(
    named: Path, runs_remote_code: bool, flag: bool, params: str | Path | None, what: str, module: str, argv: list
) -> None:
    """For a base (`named`) whose Python code would run: the user's consent, then `python -m module argv` again in
    ChatGLM-6B's environment unless this is it. A base still to download is never the project's own: only the
    flag consents to it."""
    if not runs_remote_code:
        return
    consent.require_consent(named, consent.user_trusts(named, flag, params), what)
    if not legacy_env.is_current():
        legacy_env.reexec(module, argv)


@dataclass(frozen=True)
class Opened:
    """A bundle ready to load: its manifest, its verified base, and the user's consent to the base's code."""

    directory: Path
    manifest: dict
    base: Path
    trust_remote_code: bool


def open_bundle(
    directory: str | Path,
    override: str | Path | None,
    *,
    trust_flag: bool,
    allow_pickle_flag: bool,
    params: str | Path | None,
) -> Opened:
    manifest = read_manifest(directory)
    base = origin.resolve(directory, manifest, override, allow_pickle_flag=allow_pickle_flag, params=params)
    return Opened(Path(directory), manifest, base, consent.user_trusts(base, trust_flag, params))
