"""Where a deploy bundle's base model comes from, and finding that same base on another machine.

`deploy` copies from models/base/ptune_source.json what names the base's origin: a hub repository and the commit
its revision resolved to (sources hf_hub, modelscope), a git URL and commit (git_lfs); a local path only where that is
all there is (sources path and embedded, which have no origin elsewhere). It adds the sha256 of every file
transformers may read as weights (trust.weight_files: a sharded checkpoint's index and every shard it names too,
whatever its name): the prefix's base_config_sha256 covers the architecture alone, and two checkpoints of one
architecture share it.

Serving (`resolve`) finds the base by that record: the user's `--base DIR` first; else the project's models/base
when its own record names the same origin; else, for a hub repository, the hub library's cache (downloading the
snapshot when it is missing, or using the cached one with a warning when the hub is out of reach); else the recorded
local path. Whatever is found must hold every recorded weight file with its sha256 (`verify`). The record is the
bundle's word, and a bundle is easy to copy or download: it never consents to anything. Pickled weights load only
with the user's consent (`--allow-pickle`, or params' fetch_weights.allow_pickle for the project's own models/base);
remote code is bundle/consent.py's. This module imports neither torch nor the hub libraries at its top, so that
the CLI can read a record before choosing its environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..errors import PtuneError
from ..model import trust
from ..paths import BASE, SOURCE_RECORD
from .consent import ALLOW_PICKLE_FLAG, params_consent
from .manifest import MANIFEST

log = logging.getLogger(__name__)

HUB_SOURCES = ("hf_hub", "modelscope")
# What names the origin, per source (the rest of ptune_source.json describes how it was fetched or built).
ORIGIN_KEYS = {"hf_hub": ("repo", "revision"), "modelscope": ("repo", "revision"), "git_lfs": ("repo", "revision")}


def sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def record(base: Path, config_sha256: str) -> dict:
    """The bundle's `base`: origin (from fetch_weights' record), backend, config sha256, each weight's sha256."""
    source_path = base / SOURCE_RECORD
    if not source_path.is_file():
        raise PtuneError(f"{source_path}: missing; rerun fetch_weights (`dvc repro fetch_weights`) before deploy")
    fetched = json.loads(source_path.read_text(encoding="utf-8"))
    source = fetched.get("source")
    out = {"source": source, "backend": fetched.get("backend")}
    keys = ORIGIN_KEYS.get(source, ())
    for key in keys:
        if not fetched.get(key):
            raise PtuneError(f"{source_path}: source {source} without {key!r}; rerun fetch_weights")
        out[key] = fetched[key]
    if source not in HUB_SOURCES:
        out["path"] = str(base)  # git_lfs, path, embedded: found here, or given with --base on another machine
    out["config_sha256"] = config_sha256
    out["weights"] = {str(rel): sha256(base / rel) for rel in trust.weight_files(base)}
    if not out["weights"]:
        raise PtuneError(f"{base}: no weight files (*.safetensors, *.bin); rerun fetch_weights")
    return out


def describe(rec: dict) -> str:
    """The base in words, for messages and the model card."""
    if rec.get("source") in ORIGIN_KEYS:
        return f"{rec['source']} {rec['repo']}@{rec['revision']}"
    return f"{rec.get('source')} model at {rec.get('path')}"


def _same_origin(folder: Path, rec: dict) -> bool:
    """Whether `folder`'s fetch_weights record names the origin `rec` names (never enough alone: see verify)."""
    try:
        fetched = json.loads((folder / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(fetched, dict) or fetched.get("source") != rec.get("source"):
        return False
    return all(fetched.get(k) == rec.get(k) for k in ORIGIN_KEYS.get(rec["source"], ()))


def _from_hub(rec: dict, key: str) -> Path:
    from ..sources import hub

    # Pickled weights the bundle does not name are never downloaded: they would only be read by mistake.
    ignore = [] if any(trust.is_pickle(w) for w in rec["weights"]) else [f"*{s}" for s in trust.PICKLE_SUFFIXES]
    if rec["source"] == "hf_hub":
        return hub.hf_hub(rec["repo"], rec["revision"], key=key, ignore_patterns=ignore)
    return hub.modelscope(rec["repo"], rec["revision"], key=key)


def find(bundle: Path, rec: dict, override: str | Path | None) -> Path:
    """The folder of the base `rec` names (unverified): `override`, the project's models/base, the hub, the path."""
    manifest = bundle / MANIFEST
    if override is not None:
        folder = Path(override).expanduser()
        if not (folder / "config.json").is_file():
            raise PtuneError(f"--base {override}: no model here (no config.json); give the base model's folder")
        return folder
    source = rec.get("source")
    if source in ORIGIN_KEYS and BASE.is_dir() and _same_origin(BASE, rec):
        return BASE
    if source in HUB_SOURCES:
        return _from_hub(rec, f"{manifest} base.repo")
    path = Path(rec.get("path") or BASE)
    if (path / "config.json").is_file():
        return path
    where = (
        f"the git repository {rec['repo']} at commit {rec['revision']} (clone it with git lfs)"
        if source == "git_lfs"
        else f"the {source} model the bundle was built from"
    )
    raise PtuneError(
        f"{manifest}: its base model ({describe(rec)}) is not at {path} on this machine; pass --base DIR with "
        f"{where}. Its weights are checked against the sha256s the bundle records"
    )


def verify(folder: Path, rec: dict, what: str, allow_pickle: bool) -> None:
    """`folder` holds every weight file `rec` names, each with its sha256, and no other weights (trust.weight_files:
    an index, or a shard it names, that `rec` lacks is refused, as is an index naming a path); pickled ones only
    with `allow_pickle` (the user's consent, see allow_pickle_consent)."""
    expected = rec.get("weights") or {}
    found = {str(p) for p in trust.weight_files(folder)}
    missing = sorted(set(expected) - found)
    if missing:
        raise PtuneError(
            f"{folder}: the base model lacks {', '.join(missing[:4])}, which {what} records; it is not the base "
            f"the prefix was tuned on ({describe(rec)}): pass --base DIR with that model"
        )
    extra = sorted(found - set(expected))
    if (
        extra
        and all(Path(w).suffix in trust.PICKLE_SUFFIXES for w in extra)
        and not any(trust.is_pickle(w) for w in expected)
    ):
        # A cache filled by another tool may hold the repository's pickled copies too: the loader prefers the
        # safetensors weights, which are checked below, and never reads these.
        log.warning("%s: not reading %s (pickles %s does not record)", folder, ", ".join(extra[:4]), what)
    elif extra:
        raise PtuneError(
            f"{folder}: weight file(s) {', '.join(extra[:4])} that {what} does not record; it is not the base the "
            f"prefix was tuned on ({describe(rec)}): pass --base DIR with that model (a bundle made before ptune "
            "recorded a sharded base's index files, *.index.json, is rebuilt with `dvc repro deploy`)"
        )
    pickles = sorted(w for w in expected if trust.is_pickle(w))
    if pickles and not allow_pickle:
        raise PtuneError(
            f"{what} names a base whose weights are pickles ({', '.join(pickles[:4])}) in {folder}; unpickling can "
            f"run code, and a record inside a folder is not your consent. Pass {ALLOW_PICKLE_FLAG} if you trust "
            "them (for the project's own models/base, fetch_weights.allow_pickle: true in params.yaml is enough)"
        )
    for name, digest in sorted(expected.items()):
        actual = sha256(folder / name)
        if actual != digest:
            raise PtuneError(
                f"{folder / name}: sha256 {actual}, but {what} records {digest}; these are other weights than the "
                f"prefix was tuned on ({describe(rec)}): fetch that base again, or pass --base DIR with it"
            )


def allow_pickle_consent(base: Path, flag: bool, params: str | Path | None) -> bool:
    """The user's consent to unpickle `base`'s weights: their flag, or their params' fetch_weights.allow_pickle
    when `base` is the project's own models/base (as consent.user_trusts decides for remote code)."""
    if flag:
        return True
    return params_consent(base, params, "allow_pickle")


def resolve(
    bundle: str | Path,
    manifest: dict,
    override: str | Path | None = None,
    *,
    allow_pickle_flag: bool = False,
    params: str | Path | None = None,
) -> Path:
    """The verified base folder of `bundle` (whose manifest is `manifest`): found by the user's --base
    (`override`) or the bundle's record, and checked against the record's weight sha256s with the user's consent to
    pickles. The serving command calls it once and hands the folder to Bundle.load."""
    rec = manifest["base"]
    what = f"{Path(bundle) / MANIFEST}"
    folder = find(Path(bundle), rec, override)
    log.info("base model of %s: %s (%s); checking its weights' sha256", bundle, folder, describe(rec))
    verify(folder, rec, what, allow_pickle_consent(folder, allow_pickle_flag, params))
    return folder


def local_base(bundle: str | Path, override: str | Path | None) -> Path | None:
    """The base a bundle would use on this machine without downloading anything (None when it must be fetched or
    the bundle cannot be read): for the CLI's choice of environment, before any model code loads."""
    try:
        manifest = json.loads((Path(bundle) / MANIFEST).read_text(encoding="utf-8"))
        rec = manifest["base"]
        if override is not None:
            return Path(override)
        if rec.get("source") in ORIGIN_KEYS and BASE.is_dir() and _same_origin(BASE, rec):
            return BASE
        if rec.get("source") in HUB_SOURCES:
            return None
        return Path(rec.get("path") or BASE)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
