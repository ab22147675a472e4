"""One run of a stage at a time per checkout: a second `ptune <stage>` fails at once instead of corrupting the first.

DVC releases its repository lock while a stage command runs (so that `--cores 2` can run stages side by side),
which lets two `dvc repro` in one checkout start the same stage twice; both would write the same resume state
and outputs. An advisory lock per stage closes that gap. The kernel drops it when its process dies, SIGKILL
included, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import PtuneError

LOCK_DIR = Path(".ptune/locks")


@contextlib.contextmanager
def stage_lock(stage: str, lock_dir: Path = LOCK_DIR) -> Iterator[None]:
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{stage}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise PtuneError(f"stage {stage} is already running in this checkout (pid {holder}; lock {path}). "
                             "Wait for it to finish, or stop it, then rerun; two runs of one stage would "
                             "overwrite each other's work") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
