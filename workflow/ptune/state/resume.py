"""Where a killed stage finds its progress: .ptune/state/<stage>/<key>/, outside the declared outputs.

DVC and Snakemake delete a stage's declared outputs before rerunning it, so progress (finished evaluation
batches, later training checkpoints) lives here instead, under a key that hashes the stage's inputs and params.
State is used only when the key matches, and removed when the stage completes. State of another key is an
interrupted run with other inputs or params: a stage that starts sets the newest of them aside (kept, with a
warning saying how to resume it) and deletes older ones, so that $PTUNE_KEEP_RUNS runs per stage remain (default
2: this one and the last interrupted one). A params edit, deliberate or not, must not silently cost hours of
training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import PtuneError
from ..paths import STATE_DIR
from . import atomic

log = logging.getLogger(__name__)

# Files larger than this are fingerprinted by size and their first and last MiB: hashing 12 GB of weights at
# every start would cost more than it protects against (a changed large file almost always changes there too).
FULL_HASH_LIMIT = 64 << 20
EDGE = 1 << 20
# A key is the first 16 hex digits of a sha256 (`fingerprint`); anything else in a stage's folder is not a run.
KEY_LENGTH = 16
_KEY = re.compile(rf"[0-9a-f]{{{KEY_LENGTH}}}")
KEEP_RUNS_ENV = "PTUNE_KEEP_RUNS"
DEFAULT_KEEP_RUNS = 2


def is_key(name: str) -> bool:
    """Whether `name` has the form `fingerprint` gives a run's key (16 lowercase hex digits)."""
    return _KEY.fullmatch(name) is not None


def keep_runs() -> int:
    """$PTUNE_KEEP_RUNS: how many runs' resume state a stage keeps, here and on the remote (the running one
    included); default 2. An environment variable, not a param: params are part of the stages' hashes."""
    value = os.environ.get(KEEP_RUNS_ENV, "").strip()
    if not value:
        return DEFAULT_KEEP_RUNS
    if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise PtuneError(
            f"{KEEP_RUNS_ENV}={value!r}: must be a whole number of runs, at least 1 (the running one); "
            f"unset it for the default, {DEFAULT_KEEP_RUNS}"
        )
    return int(value)


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
    return h.hexdigest()[:KEY_LENGTH]


def runs_by_age(stage_dir: Path) -> list[Path]:
    """The run folders (named by a key) of one stage, newest first."""
    if not stage_dir.is_dir():
        return []
    runs = [p for p in stage_dir.iterdir() if is_key(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(runs, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)


class ResumeState:
    """The resume directory of one stage for one set of inputs and params."""

    def __init__(self, stage: str, inputs: list[Path], params: Any):
        self.stage = stage
        self.stage_dir = STATE_DIR / stage
        self.key = fingerprint(inputs, params)
        self.dir = self.stage_dir / self.key
        self._set_others_aside(keep_runs())
        self.dir.mkdir(parents=True, exist_ok=True)
        os.utime(self.dir)  # the running run is the newest: pruning keeps it, `ptune checkpoint push` sends it

    def _set_others_aside(self, keep: int) -> None:
        """Keep the newest `keep - 1` interrupted runs of other keys (saying so), delete the rest."""
        if not self.stage_dir.is_dir():
            return
        for other in self.stage_dir.iterdir():
            if other.name == self.key or other.name.startswith("."):
                continue  # this run, or an atomic writer's temp file (it sweeps its own)
            if not (is_key(other.name) and other.is_dir() and not other.is_symlink()) or not any(other.iterdir()):
                log.info("removing %s (not a run, or a run that saved no progress)", other)
                _remove(other)
        for age, other in enumerate(r for r in runs_by_age(self.stage_dir) if r.name != self.key):
            if age < keep - 1:
                log.warning(
                    "%s: the resume state of an interrupted run with other inputs or params is set aside, not "
                    "used: %s (key %s); this run (key %s) does not touch it. To resume that one instead, stop this "
                    "run, restore the params it was made with (`git log -p params.yaml` shows earlier values) and "
                    "run the stage again. %s=%d keeps this many runs per stage: it is deleted once newer runs push "
                    "it out.",
                    self.stage,
                    other,
                    other.name,
                    self.key,
                    KEEP_RUNS_ENV,
                    keep,
                )
            else:
                log.warning(
                    "%s: deleting the resume state of an older interrupted run, %s (key %s): %s=%d keeps only the "
                    "newest runs per stage (raise it to keep more).",
                    self.stage,
                    other,
                    other.name,
                    KEEP_RUNS_ENV,
                    keep,
                )
                _remove(other)

    def path(self, name: str) -> Path:
        return self.dir / name

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _entry(line: str) -> tuple[int, Any] | None:
    """One journal line as (unit, value); None for a line cut short by a kill, or one that is not ours."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or type(entry.get("unit")) is not int or "value" not in entry:
        return None
    return entry["unit"], entry["value"]


def _read_journal(path: Path) -> tuple[dict[int, Any], bool]:
    """The units a journal records, and whether it ends cleanly (each line whole and newline-terminated)."""
    done: dict[int, Any] = {}
    if not path.is_file():
        return done, True
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    for line in lines[:-1]:
        entry = _entry(line)
        if entry is None:
            return done, False  # the last write was cut short; everything before it is sound
        done[entry[0]] = entry[1]
    return done, lines[-1] == ""  # text after the last newline: a line being written when the process died


def _line(unit: int, value: Any) -> str:
    return json.dumps({"unit": unit, "value": value}, ensure_ascii=False) + "\n"


class Journal:
    """An append-only JSON-lines record of finished units of work; a line cut short by a kill is ignored.

    Several processes sharing the work each append to their own file; `also_read` lists the others', whose
    units count as done too (they are read, never rewritten).
    """

    def __init__(self, path: Path, also_read: Iterable[Path] = ()):
        self.path = path
        self.done = self.read_all(p for p in also_read if p != path)
        own, clean = _read_journal(path)
        if not clean:
            # Drop a torn tail so that appends start on a clean line. Through a temp file and a rename, never in
            # place: a kill or a full disk in the middle of a rewrite would lose the batches it holds.
            atomic.write_text(path, "".join(_line(unit, value) for unit, value in own.items()))
        self.done.update(own)

    @staticmethod
    def read_all(paths: Iterable[Path]) -> dict[int, Any]:
        """The units recorded in any of these journals."""
        done: dict[int, Any] = {}
        for path in sorted(paths):
            done.update(_read_journal(path)[0])
        return done

    def record(self, unit: int, value: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(_line(unit, value))
            fh.flush()
            os.fsync(fh.fileno())
        self.done[unit] = value
