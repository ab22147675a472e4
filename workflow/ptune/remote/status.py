"""`ptune status`: per stage, whether the workspace is up to date and whether the remote holds its outputs.

DVC computes everything (`dvc status` and `dvc status --cloud`, through its Python API); this only sorts DVC's
answer by stage and says what to run. Words used:

  workspace: up to date | changed (will recompute) | missing locally | never run
  remote:    on remote | not on remote | partly on remote | unknown (unreachable) | -
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import yaml

from ..errors import PtuneError
from ..paths import timings
from ..state import stagelog, stopping
from . import checkpoints
from .dvc_lock import locked_outs
from .dvc_remote import open_repo, remote_info, survival_warning

log = logging.getLogger(__name__)

DVC_YAML = Path("dvc.yaml")


def _workspace_state(stage: str, changes: list, locked: bool) -> str:
    if not locked:
        return "never run"
    changed = missing = False
    for entry in changes:
        if isinstance(entry, str):  # "always changed", "changed checksum"
            changed = True
            continue
        for kind, paths in entry.items():
            if kind == "changed outs":
                for path, what in paths.items():
                    if what == "modified":
                        changed = True
                    elif not Path(path).exists():  # "deleted", or "not in cache" with the file gone too
                        missing = True
            elif kind == "changed deps":
                # A dep that is missing is some upstream stage's output: that stage shows it, not this one.
                changed |= any(what != "deleted" for what in paths.values())
            else:  # changed params, changed command
                changed = True
    if changed:
        return "changed (will recompute)"
    return "missing locally" if missing else "up to date"


def _remote_state(outs: list, cloud: dict[str, str] | None) -> str:
    if not outs:
        return "-"
    if cloud is None:
        return "unknown (unreachable)"
    entries = {
        path: what for path, what in cloud.items() if any(path == o.path or path.startswith(o.path + "/") for o in outs)
    }
    absent = [p for p, what in entries.items() if what in ("new", "missing")]
    if not absent:
        return "on remote"
    return "not on remote" if len(absent) == len(entries) else "partly on remote"


def _resume_state(remote: str | None, reachable: bool) -> dict:
    """stage -> the newest resume file here and on the remote (a training killed, or pushed while it ran), whether
    the stage is running now (its pid), and how it stopped when it stopped on request (its stopped.json)."""
    manifests = {}
    if reachable:
        try:
            store = checkpoints.RemoteState(remote)
            for stage in store.stages():
                try:
                    manifests[stage] = store.manifest(stage)
                except PtuneError as exc:  # a manifest ptune did not write: say so, and show the rest
                    log.warning("%s", exc)
        except Exception:  # resume state is extra; the stage table is the answer
            manifests = {}
    found = {}
    local = checkpoints.local_states(None)
    running = stopping.running_stages()
    for stage in sorted(set(local) | set(manifests)):
        manifest = manifests.get(stage)
        files = [name for name in (manifest.runs[0].files if manifest else {}) if name != stopping.RECORD]
        found[stage] = {
            "local": checkpoints.local_latest(stage),
            "remote": max(files) if files else None,
            "running": running.get(stage),
            # A run that is going on again after a stop has not stopped (its record goes when it finishes).
            "stopped": None if stage in running else stopping.read_record(local.get(stage)),
        }
    return found


def _stopped_line(stage: str, record: dict) -> str:
    """What `ptune status` says about a run stopped on request."""
    if stage == "train" and "step" in record:
        where = f"after step {record['step']} of {record.get('max_steps', '?')} ({record.get('checkpoint')} holds it)"
    elif "batches_done" in record:
        done = record["batches_done"]
        where = "with " + ", ".join(f"{name} {n} of {record.get('batches', '?')}" for name, n in done.items())
        where += " batches generated"
    else:
        where = "(no progress recorded)"
    why = record.get("reason")
    why = "" if why == f"{record.get('signal')} received" else f" ({why})"
    return (
        f"  stopped by {record.get('signal')}{why} at {record.get('at')}, {where}; `dvc repro` or "
        "`snakemake --cores 1 report` resumes it"
    )


def library_changes(stage: str) -> list[str]:
    """The libraries that differ between the stage's last run (its reports/timings/<stage>.json) and this
    environment: what DVC cannot see. python and torch always (ChatGLM-6B's environment shares the main one's torch);
    the others only for a stage that ran in this environment."""
    try:
        record = json.loads(timings(stage).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    ran = record.get("versions") if isinstance(record, dict) else None
    if not isinstance(ran, dict):
        return []
    same_env = record.get("environment") == sys.prefix
    now = stagelog.versions()
    return [
        f"{name} {ran[name]} (now {now[name]})"
        for name in now
        if name in ran and ran[name] != now[name] and (same_env or name in ("python", "torch"))
    ]


def collect(remote: str | None = None) -> dict:
    """The status as a dict (what `ptune status --json` prints)."""
    stages = list(yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))["stages"])
    outs = locked_outs()
    with open_repo() as repo:
        info = remote_info(repo)
        local = repo.status()
        cloud_error = None
        try:
            cloud = repo.status(cloud=True, remote=remote) if info.name or remote else None
        except Exception as exc:  # offline, credentials, a bucket that is gone: say so, show the rest
            cloud, cloud_error = None, str(exc)
    rows = {
        name: {
            "workspace": _workspace_state(name, local.get(name, []), name in outs),
            "remote": _remote_state(outs.get(name, []), cloud),
            "libraries": library_changes(name),
        }
        for name in stages
    }
    resume = _resume_state(remote, reachable=cloud is not None)
    return {
        "remote": {
            "name": info.name,
            "url": info.url,
            "where": info.describe(),
            "same_disk": info.same_disk,
            "error": cloud_error,
            "warning": survival_warning(info),
        },
        "stages": rows,
        "resume_state": resume,
    }


def render(status: dict) -> str:
    lines = [status["remote"]["where"]]
    if status["remote"]["error"]:
        lines.append(f"  (could not reach it: {status['remote']['error']})")
    lines += ["", f"{'stage':<15} {'workspace':<26} remote"]
    for name, row in status["stages"].items():
        lines.append(f"{name:<15} {row['workspace']:<26} {row['remote']}")
    upgraded = {name: row["libraries"] for name, row in status["stages"].items() if row.get("libraries")}
    for name, changes in upgraded.items():
        lines.append(f"  {name} ran with {', '.join(changes)}")
    for stage, where in status["resume_state"].items():
        lines.append(
            f"\nresume state of {stage}: {where['local'] or 'none'} here, {where['remote'] or 'none'} on the remote"
        )
        if where.get("running"):
            lines.append(f"  running now (pid {where['running']})")
        if where.get("stopped"):
            lines.append(_stopped_line(stage, where["stopped"]))
    states = [row["workspace"] for row in status["stages"].values()]
    remotes = [row["remote"] for row in status["stages"].values()]
    hints = []
    if "missing locally" in states:
        hints.append(
            "restore what is missing: `dvc checkout` (from the local cache) or `ptune restore` (from the remote)"
        )
    if any(s.startswith("changed") or s == "never run" for s in states):
        hints.append("compute what changed: `snakemake --cores 1 report` or `dvc repro`")
    if upgraded:
        hints.append(
            "libraries changed since these stages ran, which DVC does not hash: if that can change their results, "
            f"recompute them: `dvc repro -f -s {' '.join(upgraded)}`, then `dvc repro`"
        )
    if any(r in ("not on remote", "partly on remote") for r in remotes):
        hints.append("save it to the remote: `ptune push`")
    if hints:
        lines += [""] + [f"- {h}" for h in hints]
    return "\n".join(lines)


def run(as_json: bool = False, remote: str | None = None) -> None:
    status = collect(remote)
    print(json.dumps(status, indent=2) if as_json else render(status))
    if status["remote"]["warning"]:
        print(status["remote"]["warning"], file=sys.stderr)
