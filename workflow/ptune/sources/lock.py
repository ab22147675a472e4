"""One fetch per output folder at a time: an advisory lock that the kernel drops when its process dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import PtuneError
from ..stagelog import STATE_DIR

LOCK_DIR = STATE_DIR / "locks"


@contextlib.contextmanager
def exclusive(target: str | Path) -> Iterator[None]:
    """Hold the lock of `target` (e.g. models/base) for the block; fail at once if another process holds it."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    name = str(Path(target)).strip("/").replace("/", "-") or "root"
    lock_path = LOCK_DIR / f"{name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise PtuneError(f"{target}: another process (pid {holder}) is fetching into it right now "
                             f"(lock {lock_path}); wait for it to finish, or stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock; a killed process releases it too
