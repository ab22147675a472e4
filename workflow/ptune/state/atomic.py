"""Outputs appear only complete: write to a temporary sibling, then rename over the target."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import PtuneError
from . import faults


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(target: Path) -> None:
    """Remove temp siblings of `target` left by a killed writer (its pid is gone), so a kill leaves no litter."""
    for prefix in (f".{target.name}.tmp-", f".{target.name}.old-"):
        for stale in target.parent.glob(f"{prefix}*"):
            pid = stale.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)


def _is_disk_full(exc: BaseException) -> bool:
    # Writers in native code (safetensors, arrow) report ENOSPC in their own exception types, by message.
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(exc) or "os error 28" in str(exc)


def _disk_full(target: Path) -> PtuneError:
    return PtuneError(
        f"{target}: the disk is full (no space left on device); free space under {target.parent} "
        "and rerun (nothing was written there)"
    )


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temp directory next to `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output should not be
        faults.point("output")
        if target.exists():
            # Move the old one aside first, so that at no point does a half-replaced directory exist.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(exc):
            raise _disk_full(target) from None
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file next to `target` for writing; it is fsynced and renamed onto `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    tmp = Path(tmp_name)
    encoding = None if "b" in mode else "utf-8"
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp makes it private; the output should not be
        faults.point("output")
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(exc):
            raise _disk_full(target) from None
        raise


def write_text(target: str | Path, text: str) -> None:
    with atomic_file(target) as fh:
        fh.write(text)


def write_json(target: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent, UTF-8 as is), so reruns compare byte for byte."""
    write_text(target, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
