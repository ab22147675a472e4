"""Git LFS pointer files: the ~130-byte stand-ins a clone leaves when the real content was never downloaded.

A pointer handed to torch or a tokenizer fails far from its cause ("invalid load key", "not a valid
SentencePiece model"); these checks fail at the fetch, naming the files and the command that downloads them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import PtuneError

SPEC_LINE = b"version https://git-lfs.github.com/spec/v1"
# The spec caps a pointer at 1024 bytes; anything larger is content.
MAX_POINTER_BYTES = 1024
_OID = re.compile(rb"^oid sha256:([0-9a-f]{64})$", re.M)
_SIZE = re.compile(rb"^size (\d+)$", re.M)


@dataclass(frozen=True)
class Pointer:
    oid: str  # sha256 of the real content, hex
    size: int  # bytes of the real content


def parse_pointer(data: bytes) -> Pointer | None:
    """The pointer in `data`, or None when `data` is not a Git LFS pointer."""
    if len(data) > MAX_POINTER_BYTES or not data.startswith(SPEC_LINE):
        return None
    oid, size = _OID.search(data), _SIZE.search(data)
    if not oid or not size:
        return None
    return Pointer(oid.group(1).decode(), int(size.group(1)))


def read_pointer(path: str | Path) -> Pointer | None:
    """The pointer stored in the file at `path`, or None when the file holds real content."""
    path = Path(path)
    if path.stat().st_size > MAX_POINTER_BYTES:
        return None
    return parse_pointer(path.read_bytes())


def pointer_files(folder: str | Path) -> dict[Path, Pointer]:
    """Every file under `folder` (`.git` excluded) that is still a Git LFS pointer, by path relative to it."""
    folder = Path(folder)
    found = {}
    for path in sorted(folder.rglob("*")):
        if ".git" in path.relative_to(folder).parts or not path.is_file():
            continue
        pointer = read_pointer(path)
        if pointer is not None:
            found[path.relative_to(folder)] = pointer
    return found


def require_no_pointers(folder: str | Path, what: str) -> None:
    """Raise PtuneError naming each pointer file under `folder` and how to download the real content.

    `what` names the folder in the message, e.g. "fetch_weights.path /data/chatglm-6b".
    """
    folder = Path(folder)
    found = pointer_files(folder)
    if not found:
        return
    listed = "\n".join(
        f"  {rel} (a pointer to {p.size:,} bytes, sha256 {p.oid[:12]}…)" for rel, p in list(found.items())[:20]
    )
    more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
    raise PtuneError(
        f"{what}: {len(found)} file(s) are Git LFS pointers, not their content (the clone skipped or did not "
        f"finish the LFS download):\n{listed}{more}\n"
        f"Download them with `git -C {folder} lfs pull` (install Git LFS first: `apt-get install git-lfs`, "
        "then `git lfs install`), or use fetch_weights.source: git_lfs, which resumes and verifies the download."
    )


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def content_problem(path: str | Path, pointer: Pointer) -> str | None:
    """Why the file at `path` is not the content `pointer` names, or None when it is."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if read_pointer(path) is not None:
        return "still a pointer"
    if size != pointer.size:
        return f"{size:,} bytes, expected {pointer.size:,} (truncated or partial)"
    actual = file_sha256(path)
    if actual != pointer.oid:
        return f"sha256 {actual}, expected {pointer.oid} (corrupt)"
    return None
