"""`ptune checkpoint push|pull`: resume state (.ptune/state/<stage>/<key>/) to and from the DVC remote.

Resume state is not a DVC output (DVC deletes outputs before a rerun), so `dvc push` never sees it. It goes to
`<remote>/ptune-state/<stage>/` through DVC's own filesystem for that remote (same URL, credentials and endpoint as
`dvc push`), beside DVC's `files/` and never inside it, so `dvc gc --cloud` leaves it alone:

    <remote>/ptune-state/train/manifest.json          {"key", "files": {name: {"md5", "size"}}, "older", ...}
    <remote>/ptune-state/train/<key>/checkpoint-00000040.safetensors

The manifest is written last, so a push cut short leaves the previous complete state readable; files it no longer
names (older checkpoints) are removed after it. Before the manifest names a file, the remote is listed: each file is
there with its size, or it is sent again, or the push fails naming it (remote/verify.py); a file the old manifest
named but the remote lost is sent again, not skipped. A push of another key (the params changed) keeps the run it
replaces under "older", up to $PTUNE_KEEP_RUNS runs in all, and says so. A pull trusts nothing the remote says
until `manifest.check_manifest` accepts it (keys, file names, the stage: they become local paths), downloads into
a temp name, checks the md5, then renames: a half-downloaded checkpoint is never taken for one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path

from ..errors import PtuneError
from ..paths import PTUNE_DIR, STATE_DIR
from ..state.resume import KEEP_RUNS_ENV, keep_runs, runs_by_age
from ..state.stopping import RECORD as STOP_RECORD
from . import verify
from .dvc_remote import open_repo
from .manifest import MAX_MANIFEST_BYTES, SYNCED_STAGES, Manifest, Run, StateFile, check_manifest, check_stage
from .manifest import local_path as _local_path

log = logging.getLogger(__name__)

REMOTE_DIR = "ptune-state"
MANIFEST = "manifest.json"


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
    """stage -> its newest run's resume directory (the running one, or the last interrupted), where it holds
    files; hidden names are files still being written (atomic temp files)."""
    found: dict[str, Path] = {}
    for stage in stages or SYNCED_STAGES:
        runs = runs_by_age(STATE_DIR / check_stage(stage))
        if runs and any(f.is_file() and not f.name.startswith(".") for f in runs[0].iterdir()):
            found[stage] = runs[0]
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

    def manifest(self, stage: str) -> Manifest | None:
        """The stage's manifest, checked (manifest.check_manifest); None where the remote has none."""
        path = self._path(check_stage(stage), MANIFEST)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
        return check_manifest(raw, stage, path)

    def stages(self) -> list[str]:
        if not self.fs.exists(self.base):
            return []
        names = [self.fs.name(p.rstrip("/")) for p in self.fs.ls(self.base, detail=False)]
        for name in sorted(set(names) - set(SYNCED_STAGES)):
            # Only stages whose state travels are pulled: another folder here is not ptune's, and its name
            # would become a local path.
            log.warning("ignored %s on the remote: not a stage whose resume state travels", self._path(name))
        return sorted(n for n in SYNCED_STAGES if n in names and self.fs.exists(self._path(n, MANIFEST)))

    def push_stage(self, stage: str, local: Path) -> dict:
        """Upload one stage's resume directory; returns the manifest written. Runs of other keys already on the
        remote stay, up to $PTUNE_KEEP_RUNS runs in all (this one first)."""
        key = local.name
        try:
            old = self.manifest(stage)
        except PtuneError as exc:
            # Not ours (or damaged): replaced below, and the files it named are removed with everything else
            # that the new manifest does not name.
            log.warning("replacing the remote's resume state of %s: %s", stage, exc)
            old = None
        old_runs = {r.key: r for r in old.runs} if old else {}
        old_files = old_runs[key].files if key in old_runs else {}
        files: dict[str, StateFile] = {}
        sent: list[verify.Expected] = []
        uploaded = 0
        where = f"the remote '{self.name}' ({self._path(stage)})"
        # What the remote holds now, not what the old manifest says it should: a file lost there is sent again.
        lost = verify.lost(self.fs, {self._path(stage, key, n): f.size for n, f in old_files.items()})
        with tempfile.TemporaryDirectory(prefix="ptune-push-", dir=PTUNE_DIR) as tmp:
            for src in sorted(p for p in local.iterdir() if p.is_file() and not p.name.startswith(".")):
                snap = Path(tmp) / src.name
                try:
                    meta = _copy_hashed(src, snap)
                except FileNotFoundError:
                    continue  # pruned by the running stage (save_total_limit) while we were listing
                files[src.name] = meta
                dest = self._path(stage, key, src.name)
                if old_files.get(src.name) != meta or dest in lost:
                    self.fs.put_file(str(snap), dest)
                    uploaded += 1
                # Kept until checked on the remote (below), to be sent again from.
                sent.append(
                    verify.Expected(f"resume state of {stage}: {key}/{src.name}", self.fs, dest, str(snap), meta.size)
                )
            # Each file the manifest will name is on the remote, whole, before the manifest names it.
            verify.verify(sent, where)
            now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            runs = [Run(key, files, platform.node(), now)] + [r for r in (old.runs if old else ()) if r.key != key]
            keep = keep_runs()
            if old and old.runs[0].key != key:
                was = old.runs[0]
                if keep > 1:
                    log.warning(
                        "%s: the remote's resume state of key %s (pushed %s from %s) is kept as an older run; "
                        "it resumes only with the params it was made with (restore them, `ptune checkpoint "
                        "pull`, rerun). %s=%d runs per stage are kept.",
                        stage,
                        was.key,
                        was.pushed or "at an unknown time",
                        was.host or "an unknown host",
                        KEEP_RUNS_ENV,
                        keep,
                    )
            for gone in runs[keep:]:
                log.warning(
                    "%s: deleting the remote's resume state of an older run, key %s (pushed %s from %s): "
                    "%s=%d keeps only the newest runs per stage (raise it to keep more)",
                    stage,
                    gone.key,
                    gone.pushed or "at an unknown time",
                    gone.host or "an unknown host",
                    KEEP_RUNS_ENV,
                    keep,
                )
            manifest = Manifest(stage, tuple(runs[:keep])).to_json()
            mpath = Path(tmp) / MANIFEST
            raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
            mpath.write_bytes(raw)
            mremote = self._path(stage, MANIFEST)
            self.fs.put_file(str(mpath), mremote)
            done = verify.Expected(f"resume state of {stage}: {MANIFEST}", self.fs, mremote, str(mpath), len(raw))
            verify.verify([done], where)
        kept_keys = {r.key for r in runs[:keep]}
        for entry in self.fs.ls(self._path(stage), detail=False):
            if self.fs.name(entry.rstrip("/")) not in kept_keys | {MANIFEST}:
                self.fs.rm(entry, recursive=True)  # runs beyond $PTUNE_KEEP_RUNS, whole (folders too)
        keep_paths = {self._path(stage, r.key, name) for r in runs[:keep] for name in r.files}
        keep_paths.add(self._path(stage, MANIFEST))
        for path in self.fs.find(self._path(stage)):
            if path not in keep_paths:  # older checkpoints, runs beyond $PTUNE_KEEP_RUNS, files no manifest names
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

    def _pull_run(self, stage: str, run: Run) -> list[str]:
        """Download one checked run into .ptune/state/<stage>/<key>/; returns the names fetched."""
        dest = _local_path(stage, run.key)
        dest.mkdir(parents=True, exist_ok=True)
        fetched = []
        for name, meta in sorted(run.files.items()):
            target = _local_path(stage, run.key, name)  # inside dest, after symlinks too
            source = self._path(stage, run.key, name)
            if target.is_file():
                if target.stat().st_size == meta.size and _md5(target) == meta.md5:
                    continue
                log.warning("kept the local %s: it differs from the remote's copy", target)
                continue
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=dest)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                self.fs.get_file(source, str(tmp))
                got = _md5(tmp)
                if got != meta.md5:
                    raise PtuneError(
                        f"{source}: md5 {got}, but the manifest says {meta.md5}; it is damaged or still being "
                        "pushed: run `ptune checkpoint pull` again"
                    )
                os.replace(tmp, target)
            except FileNotFoundError:
                raise PtuneError(
                    f"{source} is named by the remote's manifest but missing (a push was replacing it); "
                    "run `ptune checkpoint pull` again"
                ) from None
            finally:
                tmp.unlink(missing_ok=True)
            fetched.append(name)
        return fetched

    def pull_stage(self, stage: str) -> tuple[Path, list[str]]:
        """Download one stage's resume state (every run the manifest keeps); returns the newest run's local
        directory and the files fetched, as <key>/<name>."""
        manifest = self.manifest(stage)
        if manifest is None:
            raise PtuneError(f"the remote '{self.name}' holds no resume state for {stage}")
        fetched = []
        # Oldest first, each folder touched once complete: here too the newest run is the newest folder.
        for run in reversed(manifest.runs[: keep_runs()]):
            fetched += [f"{run.key}/{name}" for name in self._pull_run(stage, run)]
            os.utime(_local_path(stage, run.key))
        newest = manifest.runs[0]
        log.info(
            "pulled resume state of %s (%s) from %s: %d file(s) fetched",
            stage,
            newest.key,
            self._path(stage),
            len(fetched),
        )
        return _local_path(stage, newest.key), fetched


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
    wanted = [check_stage(s) for s in stages] if stages else store.stages()
    return {stage: store.pull_stage(stage)[1] for stage in wanted}


def push_quietly(stage: str) -> bool:
    """Push one stage's resume state from inside a running stage: a failure is logged, never fatal. Whether it
    was pushed."""
    try:
        return bool(push([stage]))
    except Exception as exc:  # a network blip must not end a 4-hour training run
        log.warning("could not push the resume state of %s (training goes on): %s", stage, exc)
        return False


def local_latest(stage: str) -> str | None:
    """Name of the newest resume file of `stage` on this instance, or None."""
    state = local_states([stage]).get(stage)
    if state is None:
        return None
    names = sorted(
        p.name for p in state.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != STOP_RECORD
    )
    return names[-1] if names else None
