"""One fetch per output folder at a time: an advisory lock that the kernel drops when its process dies."""

from __future__ import annotations

from pathlib import Path

from ..state.locks import LOCK_DIR, held


def exclusive(target: str | Path):
    """Hold the lock of `target` (e.g. models/base) for the block; fail at once if another process holds it."""
    name = str(Path(target)).strip("/").replace("/", "-") or "root"
    lock_path = LOCK_DIR / f"{name}.lock"
    return held(
        lock_path,
        lambda holder: (
            f"{target}: another process (pid {holder}) is fetching into it right now "
            f"(lock {lock_path}); wait for it to finish, or stop it, then rerun"
        ),
    )
