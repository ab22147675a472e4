"""Where a killed stage finds its progress: .ptune/state/<stage>/<key>/, outside the declared outputs.

DVC and Snakemake delete a stage's declared outputs before rerunning it, so progress (finished evaluation
batches, later training checkpoints) lives here instead, under a key that hashes the stage's inputs and params.
State is used only when the key matches, and removed when the stage completes; state of other keys is stale
and removed when a stage starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..paths import STATE_DIR

log = logging.getLogger(__name__)

# Files larger than this are fingerprinted by size and their first and last MiB: hashing 12 GB of weights at
# every start would cost more than it protects against (a changed large file almost always changes there too).
FULL_HASH_LIMIT = 64 << 20
EDGE = 1 << 20


def _file_digest(path: Path, h: "hashlib._Hash") -> None:
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(fh.read(EDGE))
            fh.seek(size - EDGE)
            h.update(fh.read(EDGE))


def fingerprint(inputs: list[Path], params: Any) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for root in inputs:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if path.name == ".snakemake_timestamp":
                continue
            h.update(str(path.relative_to(root.parent)).encode() + b"\0")
            _file_digest(path, h)
    return h.hexdigest()[:16]


class ResumeState:
    """The resume directory of one stage for one set of inputs and params."""

    def __init__(self, stage: str, inputs: list[Path], params: Any):
        self.stage_dir = STATE_DIR / stage
        self.key = fingerprint(inputs, params)
        self.dir = self.stage_dir / self.key
        if self.stage_dir.is_dir():
            for other in self.stage_dir.iterdir():
                if other.name != self.key:
                    log.info("removing stale resume state %s (inputs or params changed)", other)
                    shutil.rmtree(other, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _read_journal(path: Path) -> dict[int, Any]:
    done: dict[int, Any] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # the last write was cut short (or is being written); everything before it is sound
            done[entry["unit"]] = entry["value"]
    return done


class Journal:
    """An append-only JSON-lines record of finished units of work; a line cut short by a kill is ignored.

    Several processes sharing the work each append to their own file; `also_read` lists the others', whose
    units count as done too (they are read, never rewritten).
    """

    def __init__(self, path: Path, also_read: Iterable[Path] = ()):
        self.path = path
        self.done = self.read_all(p for p in also_read if p != path)
        own = _read_journal(path)
        if path.is_file():
            # Drop a torn tail so that appends start on a clean line.
            with open(path, "w", encoding="utf-8") as fh:
                for unit, value in own.items():
                    fh.write(json.dumps({"unit": unit, "value": value}, ensure_ascii=False) + "\n")
        self.done.update(own)

    @staticmethod
    def read_all(paths: Iterable[Path]) -> dict[int, Any]:
        """The units recorded in any of these journals."""
        done: dict[int, Any] = {}
        for path in sorted(paths):
            done.update(_read_journal(path))
        return done

    def record(self, unit: int, value: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"unit": unit, "value": value}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[unit] = value
