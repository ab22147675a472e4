"""One stage in a pod: a job of a cluster with no filesystem shared between jobs (Kubernetes).

What such a job receives is the workflow's sources archive that Snakemake deploys to it (`--deploy-sources`): every
git-tracked file of the project as it is in the submitting workspace (dvc.yaml, dvc.lock, params.yaml, .dvc/config,
the package), but no `.git`, no `.dvc/cache`, no `.dvc/config.local`, and no output of any other job. So the DVC
remote is the only storage the jobs share:

- the job brings its stage up to date with `dvc repro --pull STAGE` over the stage's whole upstream: dvc.lock in the
  archive is the one the run was submitted with, so the upstream stages that earlier jobs ran look changed to it,
  and DVC restores them from its run-cache (pulled from the remote first) instead of running them again;
- it pushes its stage's outputs and the run-cache (`dvc push --run-cache STAGE`), which is what the next job, and the
  submitting side's final `dvc repro --pull`, restore from;
- it writes the stage's new dvc.lock entry to the rule's output, a small file that Snakemake stores through its
  default storage: that file is how Snakemake learns that the job is done.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path

import yaml

from ..errors import PtuneError
from ..state import atomic
from . import sync
from .dvc_remote import open_repo, remote_info

log = logging.getLogger(__name__)

RECORDS = Path(".ptune/pods")


def run_key(root: Path = Path(".")) -> str:
    """What the stages' results depend on besides the data: the DAG, the params and the code (every file of the
    package that dvc.yaml lists as a stage's dep, all in the sources archive). The jobs' records live under it, so a
    run with other params, another DAG or other code never takes an earlier run's records for its own."""
    digest = hashlib.sha256()
    dvc_yaml = (root / "dvc.yaml").read_bytes()
    stages = yaml.safe_load(dvc_yaml)["stages"].values()
    code = sorted({dep for stage in stages for dep in stage.get("deps") or [] if dep.startswith("workflow/")})
    for name in ("dvc.yaml", "params.yaml", *code):
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    return digest.hexdigest()[:16]


def record_path(key: str, stage: str) -> str:
    """The rule output of `stage` when jobs share no filesystem (relative: Snakemake maps it to its storage)."""
    return f"{RECORDS}/{key}/{stage}.lock.yaml"


def _without_git() -> None:
    """A sources archive holds no `.git`, and DVC refuses to work outside git unless told to (core.no_scm), which
    `.dvc/config.local` (never in the archive, never committed) says for this copy only."""
    if Path(".git").exists():
        return
    _dvc("config", "--local", "core.no_scm", "true")


def _check_remote() -> None:
    """Refuse a remote the job cannot share: none, or a directory named relative to the project (inside the pod,
    that is the pod's own disk). An absolute directory may be a volume every pod mounts."""
    repo = open_repo()
    try:
        info = remote_info(repo)
    finally:
        repo.close()
    if info.name is None:
        raise PtuneError(
            ".dvc/config: no default DVC remote. Jobs without a shared filesystem hand their results "
            "on through it: `dvc remote add -d store s3://BUCKET/ptune` (docs/cluster.md)"
        )
    url = _written_url(info.name) or str(info.url)
    if info.local_path is not None and not Path(url.removeprefix("file://")).is_absolute():
        raise PtuneError(
            f".dvc/config: the default DVC remote '{info.name}' is the relative directory '{url}', "
            "which in a pod lies on the pod's own disk and vanishes with it. Use storage every pod "
            "reaches: `dvc remote add -d -f store s3://BUCKET/ptune`, or the absolute path of a "
            "volume mounted in every pod (the profile's kubernetes-persistent-volumes)"
        )


def _written_url(name: str) -> str | None:
    """The remote's url as the config files spell it (DVC resolves a relative directory to an absolute path)."""
    from configobj import ConfigObj

    for path in (Path(".dvc/config.local"), Path(".dvc/config")):
        if path.is_file():
            url = ConfigObj(str(path)).get(f'remote "{name}"', {}).get("url")
            if url:
                return url
    return None


def _dvc(*args: str) -> None:
    cmd = ["dvc", *args]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise PtuneError(f"`{' '.join(cmd)}` exited {proc.returncode} (its messages are above)")


def run(stage: str, record: Path) -> None:
    """Bring `stage` up to date from the shared remote, push it there, and write its dvc.lock entry to `record`."""
    stages = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8"))["stages"]
    if stage not in stages:
        raise PtuneError(f"dvc.yaml: no stage '{stage}' (stages: {', '.join(stages)})")
    _without_git()
    _check_remote()
    # Not --single-item: the upstream stages' outputs are not here, and their entries in dvc.lock may be older
    # than the jobs that made them; DVC restores each one (lock or run-cache, pulled) before it hashes the deps.
    _dvc("--wait-for-lock", "repro", "--pull", stage)
    sync.push(stage=stage)  # then checked on the remote, object by object (verify.py)
    entry = (yaml.safe_load(Path("dvc.lock").read_text(encoding="utf-8")) or {}).get("stages", {}).get(stage)
    if entry is None:
        raise PtuneError(f"dvc.lock: no entry for stage '{stage}' after `dvc repro {stage}`")
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(record, yaml.safe_dump({stage: entry}, sort_keys=False))
