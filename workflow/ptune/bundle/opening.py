"""Opening a deploy bundle for serving, in the one order every server and `python -m ptune.bundle` follow:

1. `switch_environment`, before any model code: a bundle whose base runs ChatGLM-6B's Python code needs the user's
   consent (bundle/consent.py), checked before the switch, which may build the legacy environment (a pip install):
   a folder's own record must not make ptune install anything, let alone run the folder's code; then the process
   re-executes itself in that environment.
2. `open_bundle`: bundle.json read and checked, the base found (downloaded if need be) and its weights checked
   against the bundle's record (bundle/origin.py), once, with the user's --base and consent; loading
   (bundle/loader.py, the serving engine) uses what it returns.

Several bundles served together (`--bundle NAME=PATH` repeated) share one load of the base: `check_shared_base`
compares their records first (the base's weight sha256s, backend, quantization), and only the first is opened;
the others' weights are the ones it verified, as their records say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PtuneError
from ..model import backends, legacy_env
from . import consent, origin
from .manifest import MANIFEST, read_manifest


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


def _base_of(directory: Path, manifest: dict) -> tuple[dict, str, str]:
    rec = manifest.get("base")
    if not isinstance(rec, dict) or not isinstance(rec.get("weights"), dict) or not rec["weights"]:
        raise PtuneError(f"{directory / MANIFEST}: no base weights recorded; rebuild it with `dvc repro deploy`")
    return rec, str(manifest.get("backend") or rec.get("backend")), str(manifest.get("quantization", "none"))


def check_shared_base(bundles: list[tuple[str, Path]]) -> None:
    """Bundles served by one server must be P-tuned on one base, loaded one way: the same weight files with the same
    sha256s (what each bundle records; the architecture's hash alone is shared by two checkpoints of one shape), the
    same backend and quantization (a 4-bit and a bf16 bundle cannot share one load). The first mismatch is refused,
    naming both bundles and both values. Reads bundle.json only: nothing is loaded or downloaded before it passes."""
    if len(bundles) < 2:
        return
    first_name, first_dir = bundles[0]
    first_rec, first_backend, first_quant = _base_of(first_dir, read_manifest(first_dir))
    for name, directory in bundles[1:]:
        rec, backend, quant = _base_of(directory, read_manifest(directory))
        both = f"--bundle {first_name}={first_dir} and --bundle {name}={directory}"
        if rec["weights"] != first_rec["weights"] or rec.get("config_sha256") != first_rec.get("config_sha256"):
            differ = sorted(
                k
                for k in set(rec["weights"]) | set(first_rec["weights"])
                if rec["weights"].get(k) != first_rec["weights"].get(k)
            ) or ["config_sha256"]
            k = differ[0]
            raise PtuneError(
                f"{both} were P-tuned on different bases ({origin.describe(first_rec)} vs {origin.describe(rec)}; "
                f"{k}: {first_rec['weights'].get(k, first_rec.get('config_sha256'))} vs "
                f"{rec['weights'].get(k, rec.get('config_sha256'))}); one server serves the bundles of one base: "
                "start one server per base"
            )
        if backend != first_backend:
            raise PtuneError(
                f"{both}: backends {first_backend} and {backend} differ; one server loads the base one way"
            )
        if quant != first_quant:
            raise PtuneError(
                f"{both}: quantization {first_quant} and {quant} differ (a base loaded {first_quant} cannot serve a "
                f"prefix tuned for {quant}); serve them from two servers, or rebuild one bundle with the other's"
            )
