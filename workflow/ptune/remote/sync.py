"""`ptune push` and `ptune restore`: everything an instance would lose, to the DVC remote and back.

push    = `dvc push --run-cache` (every stage output, and the run-cache: DVC has no config setting that makes a plain
          `dvc push` include it) + the resume state (`ptune checkpoint push`); then the remote is listed to check
          that each object is there with its size, and what is not is sent again or named (remote/verify.py).
restore = `dvc pull --run-cache` + the resume state. When the remote lacks an object, DVC names a hash; this names
          the stage and the file, and says what to run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import PtuneError
from . import checkpoints, verify
from .dvc_lock import LockedOut, locked_outs
from .dvc_remote import open_repo, remote_info

log = logging.getLogger(__name__)


def push(remote: str | None = None, stage: str | None = None) -> None:
    """Every output and the run-cache (and the resume state) to the remote, then checked there (verify.py).
    `stage`: that stage's outputs and the run-cache only, waiting for another DVC command's lock (a job that pushes
    as it ends: the Snakefile's PTUNE_PUSH_EACH_STAGE, a pod's `ptune pod-stage`)."""
    from dvc.exceptions import DvcException

    with open_repo(wait_for_lock=stage is not None) as repo:
        where = f"the remote '{remote}'" if remote else remote_info(repo).describe()
        try:
            pushed = repo.push(targets=[stage] if stage else None, remote=remote, run_cache=True)
        except (DvcException, OSError) as exc:  # OSError: what s3fs makes of a refusal (403 -> PermissionError)
            # DVC counts failures; the listing names them, by stage and file.
            missing = verify.missing_after_failure(repo, remote)
            named = f"\n{verify.explain(missing, where, resent=False)}" if missing else ""
            # A refusal without a word (an S3 403 to a HEAD has no body) leaves the user nothing to go on.
            hint = "; `ptune doctor` checks the remote's settings and credentials" if isinstance(exc, OSError) else ""
            raise PtuneError(f"dvc push --run-cache failed ({where}): {exc}{hint}{named}") from None
        log.info("pushed %d file(s) (stage outputs and run-cache) to %s", pushed, where)
        verify.verify_dvc_push(repo, remote, where, stage)  # DVC's count is not proof: the remote is listed
    if stage is None:
        checkpoints.push(remote=remote)


def _lost(repo, out: LockedOut) -> list[str]:
    """Files of `out` that neither the workspace nor the local cache holds."""
    odb = repo.cache.local
    if not out.is_dir:
        return [] if odb.exists(out.md5) or Path(out.path).is_file() else [out.path]
    if not odb.exists(out.md5):
        # Without the listing we cannot name files; the directory is whole in the workspace or it is lost.
        return [] if Path(out.path).is_dir() else [f"{out.path}/"]
    with open(odb.oid_to_path(out.md5), encoding="utf-8") as fh:
        entries = json.load(fh)
    return [
        f"{out.path}/{e['relpath']}"
        for e in entries
        if not odb.exists(e["md5"]) and not (Path(out.path) / e["relpath"]).is_file()
    ]


def missing_outputs(repo) -> dict[str, list[str]]:
    """stage -> its files that cannot be checked out (not in the workspace, not in the local cache)."""
    found = {}
    for stage, outs in locked_outs().items():
        lost = [path for out in outs for path in _lost(repo, out)]
        if lost:
            found[stage] = lost
    return found


def explain_missing(missing: dict[str, list[str]], where: str) -> str:
    stages = ", ".join(missing)
    listing = "\n".join(f"  {stage}: {path}" for stage, paths in missing.items() for path in paths)
    return (
        f"{where} lacks these results, and neither the workspace nor the local cache holds them:\n{listing}\n"
        f"If the instance that computed them still exists, run `ptune push` there, then `ptune restore` here "
        f"again. Otherwise recompute them: `snakemake --cores 1 report` (or `dvc repro`) reruns {stages}, and "
        "after them only the stages whose inputs come out different."
    )


def restore(remote: str | None = None) -> None:
    from dvc.exceptions import DvcException

    with open_repo() as repo:
        where = f"the remote '{remote}'" if remote else remote_info(repo).describe()
        failure = None
        try:
            repo.pull(remote=remote, run_cache=True)
        except DvcException as exc:  # DownloadError, CheckoutError: DVC speaks of hashes; we name files below
            failure = exc
        missing = missing_outputs(repo)
    if missing:
        raise PtuneError(explain_missing(missing, where))
    if failure is not None:
        raise PtuneError(f"dvc pull --run-cache failed ({where}): {failure}")
    log.info("restored every stage output from %s", where)
    store = checkpoints.RemoteState(remote)
    for stage in store.stages():
        dest, fetched = store.pull_stage(stage)
        log.info("resume state of %s: %s (%d file(s) fetched)", stage, dest, len(fetched))
