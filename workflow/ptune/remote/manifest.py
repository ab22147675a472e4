"""The manifest of a stage's resume state on the DVC remote, and the one check it passes before any use.

A manifest names local paths: a pull writes `.ptune/state/<stage>/<key>/<name>` for each file it lists. Whoever can
write to the remote (a shared bucket, a NAS, a leaked key) writes the manifest too, so nothing in it is trusted
until `check_manifest` has accepted it; unchecked, a key of `../../x` or a name of
`../../../.venv/lib/python3.11/site-packages/evil.pth` would drop a file that Python runs at every start.

    {"stage": "train", "key": K, "files": {name: {"md5", "size"}}, "host", "pushed",
     "older": [{"key", "files", "host", "pushed"}, ...]}       # earlier runs still kept, newest first

`older` holds interrupted runs of other inputs or params that are kept ($PTUNE_KEEP_RUNS); manifests written
before it existed lack it and mean the same.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PtuneError
from ..paths import STATE_DIR
from ..pipeline.declared import SYNCED as SYNCED_STAGES
from ..state.resume import KEY_LENGTH, is_key

# Stages whose resume state is a flat folder of files worth carrying to another instance. fetch_weights' state
# (a partial Git LFS clone) is not: a fresh instance fetches from the source again.
# What a file name of resume state may look like: ours are `checkpoint-00000040.safetensors` and
# `ptuned.rank0.jsonl`. A letter or digit first (no hidden names, nothing a shell or a path reads specially).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MD5 = re.compile(r"[0-9a-f]{32}")
# A manifest lists a few checkpoints or journals per run; anything much larger is not one of ours.
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class StateFile:
    md5: str
    size: int


@dataclass(frozen=True)
class Run:
    """One run's resume state: its key and files."""

    key: str
    files: dict[str, StateFile]
    host: str = ""
    pushed: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "files": {n: {"md5": f.md5, "size": f.size} for n, f in sorted(self.files.items())},
            "host": self.host,
            "pushed": self.pushed,
        }


@dataclass(frozen=True)
class Manifest:
    stage: str
    runs: tuple[Run, ...]  # newest first; runs[0] is the one a push last sent

    def to_json(self) -> dict[str, Any]:
        newest, *older = self.runs
        return {"stage": self.stage, **newest.to_json(), "older": [r.to_json() for r in older]}


class _Bad(Exception):
    """What is wrong with a manifest, in words; check_manifest turns it into a PtuneError naming the file."""


def check_stage(stage: str) -> str:
    """A stage whose resume state may travel; every other name is refused, from the remote or a command line."""
    if stage not in SYNCED_STAGES:
        raise PtuneError(
            f"{stage!r} is not a stage whose resume state travels with `ptune checkpoint push/pull` "
            f"(those are: {', '.join(SYNCED_STAGES)})"
        )
    return stage


def _check_name(name: Any) -> str:
    """A plain file name: no separator (`/`, `\\`), no `..`, not absolute, no NUL or control character, not hidden."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise _Bad(f"file name {name!r} is not a plain file name (letters, digits, '.', '_', '-'; no path)")
    return name


def _check_run(entry: Any, where: str) -> Run:
    if not isinstance(entry, dict):
        raise _Bad(f"{where}: expected an object, got {type(entry).__name__}")
    key = entry.get("key")
    if not isinstance(key, str) or not is_key(key):
        raise _Bad(f"{where}: key {key!r} is not a resume key ({KEY_LENGTH} lowercase hex digits)")
    files = entry.get("files")
    if not isinstance(files, dict):
        raise _Bad(f"{where}: 'files' must be an object of file name -> {{md5, size}}, got {type(files).__name__}")
    checked = {}
    for name, meta in files.items():
        _check_name(name)
        if not isinstance(meta, dict):
            raise _Bad(f"{where}: the entry of {name!r} must be an object {{md5, size}}")
        md5, size = meta.get("md5"), meta.get("size")
        if not isinstance(md5, str) or not _MD5.fullmatch(md5):
            raise _Bad(f"{where}: md5 of {name!r} is {md5!r}, not 32 lowercase hex digits")
        if type(size) is not int or size < 0:
            raise _Bad(f"{where}: size of {name!r} is {size!r}, not a whole number of bytes")
        checked[name] = StateFile(md5, size)
    host, pushed = entry.get("host", ""), entry.get("pushed", "")
    if not isinstance(host, str) or not isinstance(pushed, str):
        raise _Bad(f"{where}: 'host' and 'pushed' must be strings")
    return Run(key, checked, host, pushed)


def check_manifest(raw: bytes, stage: str, where: str) -> Manifest:
    """Parse and check the manifest of `stage` read from `where` (its remote path, for messages).

    Refuses, with a PtuneError naming `where` and what is wrong, and before anything is downloaded:
    - a stage other than those whose state travels (SYNCED_STAGES), or a `stage` field naming another stage:
      the stage is a folder name under .ptune/state/;
    - a key that is not what `fingerprint` makes (16 lowercase hex digits): the key is a folder name, and `..`,
      `/x` or `a/../../b` would climb out of the stage's folder;
    - a file name that is not plain (see `_check_name`): names become paths, and a separator, `..`, an absolute
      path or NUL would put a file anywhere the user can write, a hidden name could pass for a temp file;
    - wrong types, missing fields, a duplicate key, bytes that are not UTF-8 JSON or over MAX_MANIFEST_BYTES:
      a manifest ptune did not write, which would otherwise end in a traceback halfway through a pull.
    `local_path` checks each resulting path again, after symlinks, so that none leads outside the stage's folder.
    """
    check_stage(stage)
    try:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise _Bad(f"{len(raw)} bytes, more than a manifest's {MAX_MANIFEST_BYTES}")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Bad(f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise _Bad(f"expected a JSON object, got {type(data).__name__}")
        if data.get("stage", stage) != stage:
            raise _Bad(f"'stage' is {data.get('stage')!r}, but the manifest is the one of {stage!r}")
        older = data.get("older", [])
        if not isinstance(older, list):
            raise _Bad(f"'older' must be a list of runs, got {type(older).__name__}")
        runs = [_check_run(data, "the newest run")] + [_check_run(r, f"older run {i}") for i, r in enumerate(older)]
        keys = [r.key for r in runs]
        if len(set(keys)) != len(keys):
            raise _Bad(f"a key is listed twice: {keys}")
    except _Bad as exc:
        raise PtuneError(
            f"{where}: not a ptune resume-state manifest: {exc}. Nothing of {stage}'s state was downloaded. "
            "ptune did not write this: check who can write to the DVC remote, then delete that manifest there "
            "(or run `ptune checkpoint push` from the instance that holds the state, which replaces it)"
        ) from None
    return Manifest(stage, tuple(runs))


def local_path(stage: str, key: str, name: str | None = None) -> Path:
    """Where a checked run (or one of its files) lives here: `.ptune/state/<stage>/<key>[/<name>]`, and only there.

    Checked again after symlinks are followed: a `.ptune/state/train/<key>` that is a link elsewhere, or a file
    that is one, is refused rather than written through."""
    check_stage(stage)
    if not is_key(key):
        raise PtuneError(f"resume key {key!r} is not {KEY_LENGTH} lowercase hex digits")
    root = (STATE_DIR / stage).resolve()
    run_dir = STATE_DIR / stage / key
    if name is not None:
        try:
            _check_name(name)
        except _Bad as exc:
            raise PtuneError(f"resume state of {stage} ({key}): {exc}") from None
    path = run_dir if name is None else run_dir / name
    resolved = path.resolve()
    expected = root / key if name is None else root / key / name
    if resolved != expected:
        raise PtuneError(
            f"{path} leads to {resolved}, outside {STATE_DIR / stage}/ (a symbolic link?); remove it and pull again"
        )
    return path
