"""Where the DVC remote is, whether it outlives the instance, and the switches that push while a run goes on.

The remote is DVC's (its config: `.dvc/config`, `.dvc/config.local`); ptune only reads it. A remote that is a
directory on the workspace's own filesystem dies with the instance's disk, so ptune says so loudly (`ptune status`,
the end of every run) until the remote is somewhere else.

The switches are environment variables, not params: a param would be part of a stage's hash, and turning pushes on
would then rerun the stages.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import PtuneError

PUSH_EACH_STAGE_ENV = "PTUNE_PUSH_EACH_STAGE"
CHECKPOINT_PUSH_EVERY_ENV = "PTUNE_CHECKPOINT_PUSH_EVERY"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class RemoteInfo:
    """The remote a plain `dvc push` uses."""

    name: str | None  # None: no default remote configured
    url: str | None  # as DVC resolves it: an absolute path for a directory remote
    local_path: Path | None  # set for a directory remote (plain path or file://)
    same_disk: bool  # a directory on the workspace's (or the system's) disk: gone with the instance
    mount_point: Path | None  # the filesystem a directory remote lives on

    def describe(self) -> str:
        if self.name is None:
            return "no DVC remote configured"
        if self.local_path is None:
            return f"DVC remote '{self.name}': {self.url}"
        where = (
            "on this workspace's disk"
            if self.same_disk
            else f"a directory on the filesystem mounted at {self.mount_point}"
        )
        return f"DVC remote '{self.name}': {self.local_path} ({where})"


def _dvc_console_logging() -> None:
    """DVC's own messages as the `dvc` command prints them ("ERROR: ...", a traceback only with
    DVC_SHOW_TRACEBACK): importing dvc installs its console handlers; ptune's root handler would print them
    again, each with its traceback."""
    import dvc  # noqa: F401  (its import sets up DVC's console logging)

    for name in ("dvc", "dvc_objects", "dvc_data"):
        logging.getLogger(name).propagate = False


def open_repo(root: str | Path = ".", wait_for_lock: bool = False):
    """DVC's Repo for the project at `root` (imported here: dvc takes a second to import). `wait_for_lock`: wait for
    another DVC command's repository lock instead of failing at once (`dvc --wait-for-lock`: jobs that push as they
    end run beside each other)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    _dvc_console_logging()
    try:
        return Repo(str(root), _wait_for_lock=wait_for_lock)
    except NotDvcRepoError:
        raise PtuneError(
            f"{Path(root).resolve()}: not a DVC project; run ptune from the project's root (where dvc.yaml is)"
        ) from None


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.is_mount():
        path = path.parent
    return path


def _existing(path: Path) -> Path:
    """The path itself or its nearest existing parent (a remote directory appears on the first push)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def remote_info(repo, root: str | Path = ".") -> RemoteInfo:
    """The default remote of `repo` (what `dvc push` without -r uses)."""
    name = repo.config["core"].get("remote")
    if not name:
        return RemoteInfo(None, None, None, False, None)
    conf = repo.config["remote"].get(name)
    if conf is None:
        raise PtuneError(
            f".dvc/config: core.remote is '{name}', but no remote of that name is configured; "
            f"add it (`dvc remote add {name} URL`) or pick another (`dvc remote default NAME`)"
        )
    url = conf["url"]
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file") and not (len(parsed.scheme) == 1 and os.name == "nt"):
        return RemoteInfo(name, url, None, False, None)
    local = Path(parsed.path if parsed.scheme == "file" else url)
    if not local.is_absolute():
        local = Path(root) / local
    existing = _existing(local)
    # The workspace's disk, or the instance's system disk: neither outlives the instance.
    same = os.stat(existing).st_dev in (os.stat(Path(root).resolve()).st_dev, os.stat("/").st_dev)
    return RemoteInfo(name, url, local.resolve(), same, _mount_point(existing))


def survival_warning(info: RemoteInfo) -> str | None:
    """A loud, multi-line warning while nothing pushed would survive the instance; None once it would."""
    if info.name is None:
        lines = [
            "No DVC remote is configured: `dvc push` has nowhere to save this run, and everything the",
            "pipeline made is lost with this instance's disk.",
        ]
    elif info.same_disk:
        lines = [
            f"The DVC remote '{info.name}' ({info.local_path}) is on the same disk as this workspace:",
            "what `dvc push` saves there is lost with this instance's disk, together with the workspace.",
        ]
    else:
        return None
    lines += [
        "Point the default remote at storage that outlives the instance, e.g. an Alibaba OSS bucket:",
        "    ptune remote oss --bucket BUCKET --region cn-hangzhou --internal",
        "or a directory on a NAS mount: ptune remote nas /mnt/data/ptune-dvc-storage",
        "then `ptune push`. docs/surviving.md has the details.",
    ]
    bar = "!" * 100
    return "\n".join([bar, *(f"!! {line}" for line in lines), bar])


def check_survival(root: str | Path = ".") -> str | None:
    """The survival warning for the project at `root`, or None; never fails (it is advice)."""
    try:
        repo = open_repo(root)
        try:
            return survival_warning(remote_info(repo, root))
        finally:
            repo.close()
    except Exception as exc:  # a broken remote config must not turn a finished run into a failure
        return f"ptune: could not check where the DVC remote is: {exc}"


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise PtuneError(f"{name}={os.environ[name]!r}: use 1 (on) or 0 (off)")


def push_each_stage() -> bool:
    """$PTUNE_PUSH_EACH_STAGE: push each stage's outputs as soon as the stage is done (off by default)."""
    return _flag(PUSH_EACH_STAGE_ENV)


def checkpoint_push_every() -> int:
    """$PTUNE_CHECKPOINT_PUSH_EVERY=N: push the resume state after every N-th checkpoint; 0 (default): never."""
    value = os.environ.get(CHECKPOINT_PUSH_EVERY_ENV, "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise PtuneError(
            f"{CHECKPOINT_PUSH_EVERY_ENV}={value!r}: must be a whole number of checkpoints "
            "(0: never push while training)"
        )
    return int(value)
