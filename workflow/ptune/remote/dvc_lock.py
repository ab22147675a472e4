"""What dvc.lock records of each stage: its outputs (metrics and plots included) and their content hashes.

dvc.lock is DVC's file, in DVC's documented format; this only reads it, to name stages and files in messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

LOCK = Path("dvc.lock")


@dataclass(frozen=True)
class LockedOut:
    stage: str
    path: str
    md5: str  # a directory's ends in ".dir": the object listing its files

    @property
    def is_dir(self) -> bool:
        return self.md5.endswith(".dir")


def locked_outs(lock: Path = LOCK) -> dict[str, list[LockedOut]]:
    """stage -> its outputs as last run (stages never run are absent)."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {
        name: [LockedOut(name, out["path"], out["md5"]) for out in entry.get("outs", []) if "md5" in out]
        for name, entry in stages.items()
    }


def owner(path: str, outs: dict[str, list[LockedOut]]) -> LockedOut | None:
    """The locked output that `path` is, or lies in."""
    for stage_outs in outs.values():
        for out in stage_outs:
            if path == out.path or path.startswith(out.path + "/"):
                return out
    return None
