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
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import PtuneError
from ..paths import LOCK_DIR


@contextlib.contextmanager
def held(path: Path, busy: Callable[[str], str]) -> Iterator[None]:
    """Hold the advisory lock file `path` for the block; if another process holds it, fail at once with
    `busy(holder_pid)`. The kernel drops the lock when the holder dies, SIGKILL included."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise PtuneError(busy(holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def stage_lock(stage: str, lock_dir: Path = LOCK_DIR):
    path = lock_dir / f"{stage}.lock"
    return held(
        path,
        lambda holder: (
            f"stage {stage} is already running in this checkout (pid {holder}; lock "
            f"{path}). Wait for it to finish, or stop it, then rerun; two runs of one "
            "stage would overwrite each other's work"
        ),
    )
