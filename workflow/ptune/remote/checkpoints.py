"""`ptune checkpoint push|pull`: resume state (.ptune/state/<stage>/<key>/) to and from the DVC remote.

Resume state is not a DVC output (DVC deletes outputs before a rerun), so `dvc push` never sees it. It goes to
`<remote>/ptune-state/<stage>/` through DVC's own filesystem for that remote (same URL, credentials and endpoint as
`dvc push`), beside DVC's `files/` and never inside it, so `dvc gc --cloud` leaves it alone:

    <remote>/ptune-state/train/manifest.json          {"key", "files": {name: {"md5", "size"}}, ...}
    <remote>/ptune-state/train/<key>/checkpoint-00000040.safetensors

The manifest is written last, so a push cut short leaves the previous complete state readable; files it no longer
names (older checkpoints) are removed after it. A pull downloads into a temp name, checks the md5, then renames:
a half-downloaded checkpoint is never taken for one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import PtuneError
from ..paths import PTUNE_DIR, STATE_DIR
from .dvc_remote import open_repo

log = logging.getLogger(__name__)

# Stages whose resume state is a flat folder of files worth carrying to another instance. fetch_weights' state
# (a partial Git LFS clone) is not: a fresh instance fetches from the source again.
SYNCED_STAGES = ("train", "evaluate")
REMOTE_DIR = "ptune-state"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StateFile:
    md5: str
    size: int


def _copy_hashed(src: Path, dst: Path) -> StateFile:
    """Copy src to dst and hash the bytes copied (a journal may grow meanwhile: the hash is of what is sent)."""
    h = hashlib.md5()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    return StateFile(h.hexdigest(), size)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_states(stages: list[str] | None) -> dict[str, Path]:
    """stage -> its one resume directory; hidden names are files still being written (atomic temp files)."""
    found: dict[str, Path] = {}
    if not STATE_DIR.is_dir():
        return found
    for stage_dir in sorted(p for p in STATE_DIR.iterdir() if p.is_dir()):
        if stage_dir.name not in (stages or SYNCED_STAGES):
            continue
        keys = sorted(
            (p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        if keys and any(f.is_file() for f in keys[-1].iterdir()):
            found[stage_dir.name] = keys[-1]  # the stage removes stale keys when it starts; newest wins meanwhile
    return found


class RemoteState:
    """The ptune-state area of one DVC remote."""

    def __init__(self, remote_name: str | None = None, root: str | Path = "."):
        repo = open_repo(root)
        try:
            from dvc.config import NoRemoteError

            try:
                remote = repo.cloud.get_remote(remote_name, command="checkpoint push/pull")
            except NoRemoteError:
                raise PtuneError(
                    "no DVC remote is configured: add one (docs/surviving.md), "
                    "e.g. `dvc remote add -d store s3://BUCKET/ptune`"
                ) from None
        finally:
            repo.close()
        self.name = remote.name
        self.fs = remote.fs
        self.base = self.fs.join(remote.path, REMOTE_DIR)

    def _path(self, *parts: str) -> str:
        return self.fs.join(self.base, *parts)

    def manifest(self, stage: str) -> dict | None:
        path = self._path(stage, MANIFEST)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))

    def stages(self) -> list[str]:
        if not self.fs.exists(self.base):
            return []
        names = [self.fs.name(p.rstrip("/")) for p in self.fs.ls(self.base, detail=False)]
        return sorted(n for n in names if self.fs.exists(self._path(n, MANIFEST)))

    def push_stage(self, stage: str, local: Path) -> dict:
        """Upload one stage's resume directory; returns the manifest written."""
        key = local.name
        old = self.manifest(stage) or {}
        old_files = old.get("files", {}) if old.get("key") == key else {}
        files: dict[str, dict] = {}
        uploaded = 0
        with tempfile.TemporaryDirectory(prefix="ptune-push-", dir=PTUNE_DIR) as tmp:
            for src in sorted(p for p in local.iterdir() if p.is_file() and not p.name.startswith(".")):
                snap = Path(tmp) / src.name
                try:
                    meta = _copy_hashed(src, snap)
                except FileNotFoundError:
                    continue  # pruned by the running stage (save_total_limit) while we were listing
                files[src.name] = {"md5": meta.md5, "size": meta.size}
                if old_files.get(src.name) != files[src.name]:
                    self.fs.put_file(str(snap), self._path(stage, key, src.name))
                    uploaded += 1
                snap.unlink()
            manifest = {
                "stage": stage,
                "key": key,
                "files": files,
                "host": platform.node(),
                "pushed": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
            mpath = Path(tmp) / MANIFEST
            mpath.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            self.fs.put_file(str(mpath), self._path(stage, MANIFEST))
        keep = {self._path(stage, key, name) for name in files} | {self._path(stage, MANIFEST)}
        for path in self.fs.find(self._path(stage)):
            if path not in keep:  # older checkpoints, or the state of inputs and params no longer current
                self.fs.rm_file(path)
        log.info(
            "pushed resume state of %s (%s): %d file(s), %d uploaded, to %s",
            stage,
            key,
            len(files),
            uploaded,
            self._path(stage),
        )
        return manifest

    def pull_stage(self, stage: str) -> tuple[Path, list[str]]:
        """Download one stage's resume state; returns its local directory and the files fetched."""
        manifest = self.manifest(stage)
        if manifest is None:
            raise PtuneError(f"the remote '{self.name}' holds no resume state for {stage}")
        dest = STATE_DIR / stage / manifest["key"]
        dest.mkdir(parents=True, exist_ok=True)
        fetched = []
        for name, meta in sorted(manifest["files"].items()):
            target = dest / name
            if target.is_file():
                if target.stat().st_size == meta["size"] and _md5(target) == meta["md5"]:
                    continue
                log.warning("kept the local %s: it differs from the remote's copy", target)
                continue
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=dest)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                self.fs.get_file(self._path(stage, manifest["key"], name), str(tmp))
                got = _md5(tmp)
                if got != meta["md5"]:
                    raise PtuneError(
                        f"{self._path(stage, manifest['key'], name)}: md5 {got}, but the manifest "
                        f"says {meta['md5']}; it is damaged or still being pushed: run "
                        "`ptune checkpoint pull` again"
                    )
                os.replace(tmp, target)
            except FileNotFoundError:
                raise PtuneError(
                    f"{self._path(stage, manifest['key'], name)} is named by the remote's manifest but "
                    "missing (a push was replacing it); run `ptune checkpoint pull` again"
                ) from None
            finally:
                tmp.unlink(missing_ok=True)
            fetched.append(name)
        log.info(
            "pulled resume state of %s (%s) from %s: %d file(s) fetched",
            stage,
            manifest["key"],
            self._path(stage),
            len(fetched),
        )
        return dest, fetched


def push(stages: list[str] | None = None, remote: str | None = None) -> dict[str, dict]:
    """Push the local resume state of `stages` (default: every stage that has some)."""
    local = local_states(stages)
    if not local:
        return {}
    store = RemoteState(remote)
    return {stage: store.push_stage(stage, path) for stage, path in local.items()}


def pull(stages: list[str] | None = None, remote: str | None = None) -> dict[str, list[str]]:
    """Pull the resume state of `stages` (default: every stage the remote has some for)."""
    store = RemoteState(remote)
    wanted = stages or store.stages()
    return {stage: store.pull_stage(stage)[1] for stage in wanted}


def push_quietly(stage: str) -> None:
    """Push one stage's resume state from inside a running stage: a failure is logged, never fatal."""
    try:
        push([stage])
    except Exception as exc:  # a network blip must not end a 4-hour training run
        log.warning("could not push the resume state of %s (training goes on): %s", stage, exc)


def local_latest(stage: str) -> str | None:
    """Name of the newest resume file of `stage` on this instance, or None."""
    state = local_states([stage]).get(stage)
    if state is None:
        return None
    names = sorted(p.name for p in state.iterdir() if p.is_file() and not p.name.startswith("."))
    return names[-1] if names else None
