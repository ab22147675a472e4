"""Unpacking an archive that came from elsewhere (fetch_data.source: url): the one check of what it may write.

Python's own extraction filters (tarfile's `filter="data"`) are not relied on: on the Python releases this
project runs on they have had bypasses (CVE-2025-4517 and its siblings: a chain of symlinks and a name long
enough that `os.path.realpath` stops resolving, after which a member is written outside the folder), and the
zip side has no filter at all. Here ptune decides member by member, the same way on every Python and for every
format it accepts.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

from ..errors import PtuneError

CHUNK = 1 << 20
# Linux file systems take at most 255 bytes per name and 4096 per path; a member's name is kept well inside
# both, so that no write fails half-way with "File name too long" and no path check is fooled by one.
MAX_PART_BYTES = 255
MAX_NAME_BYTES = 1024


class BrokenArchive(Exception):
    """The archive cannot be read to its end (truncated, corrupt, an unknown compression): not an attack."""


class _Refused(Exception):
    def __init__(self, member: str, why: str):
        super().__init__(member, why)
        self.member, self.why = member, why


def kind(archive: Path) -> str | None:
    """ "tar" (any compression tarfile reads), "zip", or None when the file is neither."""
    if tarfile.is_tarfile(archive):
        return "tar"
    if zipfile.is_zipfile(archive):
        return "zip"
    return None


def _show(name: str) -> str:
    """A member's name for a message: quoted, and cut short if it is one of the absurdly long ones."""
    return repr(name if len(name) <= 120 else name[:100] + "…" + name[-10:])


def _parts(name: str) -> list[str]:
    """The path components a member's name stands for, relative to the extraction folder; refused if the name is
    absolute, climbs out with `..`, holds a NUL, or is too long for a file system to take."""
    if "\0" in name:
        raise _Refused(name, "a NUL byte in its name")
    if name.startswith("/"):
        raise _Refused(name, "an absolute name")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _Refused(name, "a '..' in its name, which leads out of the folder")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise _Refused(name, f"a name of {size:,} bytes, longer than the {MAX_NAME_BYTES:,} allowed")
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_PART_BYTES for part in parts):
        raise _Refused(name, f"a part of its name longer than {MAX_PART_BYTES} bytes, more than a file system takes")
    return parts


class _Budget:
    """The caps on what one archive may unpack to: members, and bytes actually written (not what headers claim)."""

    def __init__(self, max_bytes: int, max_members: int):
        self.max_bytes, self.max_members = max_bytes, max_members
        self.bytes = self.members = 0

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise _Refused(
                name,
                f"member number {self.members:,}: the archive has more than {self.max_members:,} members; "
                "if it really is a data set this large, raise fetch_data.max_archive_members",
            )

    def claim(self, name: str, size: int) -> None:
        """Refuse before writing a byte when a header already says the member would pass the cap."""
        if self.bytes + size > self.max_bytes:
            self._over(name)

    def add(self, name: str, size: int) -> None:
        self.bytes += size
        if self.bytes > self.max_bytes:
            self._over(name)

    def _over(self, name: str) -> None:
        raise _Refused(
            name,
            f"the archive unpacks to more than {self.max_bytes:,} bytes; if it really is a data set this large, "
            "raise fetch_data.max_unpacked_bytes",
        )


def _inside(root: Path, parts: list[str], name: str) -> Path:
    """The member's target under `root`, refused unless it resolves there. Only directories and regular files are
    ever created, so this cannot fail unless something else changed the folder; it stays as a second line."""
    target = root.joinpath(*parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(target)]) != real_root:
        raise _Refused(name, "it resolves to a path outside the folder")
    return target


def _mkdir(path: Path, name: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise _Refused(name, "a file of the archive stands where it needs a folder") from None


def _write(src, root: Path, parts: list[str], name: str, budget: _Budget) -> None:
    """Copy one regular member's bytes into place, counting each byte against the cap as it is written."""
    if not parts:
        raise _Refused(name, "a file with no name")
    target = _inside(root, parts, name)
    _mkdir(target.parent, name)
    if target.is_dir():
        raise _Refused(name, "a file where the archive also has a folder")
    # O_NOFOLLOW: never write through a link, should one ever be there; the mode is ours, not the archive's.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(CHUNK):
            budget.add(name, len(chunk))
            out.write(chunk)


def _tar_refusal(member: tarfile.TarInfo) -> str | None:
    """Why a tar member is not one to write: anything but a regular file or a directory."""
    if member.isreg() or member.isdir():
        return None
    if member.issym():
        return f"a symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"a hard link to {member.linkname!r}"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    return f"a member of tar type {member.type!r}, neither a file nor a folder"


def _extract_tar(archive: Path, root: Path, budget: _Budget) -> None:
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # header by header: a bomb of members is stopped at the cap, not listed first
            name = member.name
            budget.member(name)
            parts = _parts(name)
            why = _tar_refusal(member)
            if why:
                raise _Refused(name, why)
            if member.isdir():
                _mkdir(_inside(root, parts, name), name)
                continue
            budget.claim(name, member.size)
            src = tar.extractfile(member)
            if src is None:  # tarfile has no bytes for it: only links and special files, refused above
                raise _Refused(name, "a member with no content to read")
            with src:
                _write(src, root, parts, name, budget)


def _zip_refusal(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member is not one to write: a Unix mode (kept by zip tools in the high bits of the external
    attributes) of anything but a regular file or a directory, or encryption."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "a device file, FIFO or socket"
    if info.flag_bits & 0x1:
        return "an encrypted member; unpack the archive yourself and use fetch_data.source: path"
    return None


def _extract_zip(archive: Path, root: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # The central directory lists every member: a bomb of members is refused before anything is written.
        if len(infos) > budget.max_members:
            budget.members = budget.max_members
            budget.member(infos[budget.max_members].filename)
        for info in infos:
            name = info.filename
            budget.member(name)
            parts = _parts(name)
            why = _zip_refusal(info)
            if why:
                raise _Refused(name, why)
            if info.is_dir() or stat.S_ISDIR(info.external_attr >> 16):
                _mkdir(_inside(root, parts, name), name)
                continue
            budget.claim(name, info.file_size)
            with zf.open(info) as src:  # checks the member's CRC when it reaches the end
                _write(src, root, parts, name, budget)


def safe_extract(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    """Unpack the tar (plain, gz, bz2, xz) or zip `archive` into `dest`, which holds exactly its members afterwards.

    Refused, with a PtuneError "unsafe archive: MEMBER (why)" and nothing left behind (neither `dest` nor a partial
    folder):
    - any member that is not a regular file or a directory: symbolic and hard links (a link can point anywhere,
      and a later member written "through" it lands outside `dest`), devices, FIFOs, sockets;
    - an absolute name, a name with `..` among its parts, a NUL byte, a name longer than MAX_NAME_BYTES or with
      a part longer than MAX_PART_BYTES (what a file system cannot take makes a write fail half-way, and a long
      enough name is how path checks have been fooled);
    - a member whose target does not resolve inside `dest`;
    - more than `max_members` members, or more than `max_bytes` bytes written in all (a zip or tar bomb fills the
      disk from a small download): headers are checked first, and the bytes really written are counted too;
    - an encrypted zip member.
    Members' modes, owners and times are not applied: files are written 0644, folders 0755.

    Extraction happens in a temp folder beside `dest`, renamed to `dest` only when every member passed. A
    truncated or corrupt archive raises BrokenArchive; a write the disk refuses (full, permissions) a PtuneError.
    """
    archive, dest = Path(archive), Path(dest)
    fmt = kind(archive)
    if fmt is None:
        raise BrokenArchive("not a tar or zip archive")
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    budget = _Budget(max_bytes, max_members)
    try:
        try:
            (_extract_tar if fmt == "tar" else _extract_zip)(archive, tmp, budget)
        except _Refused as refused:
            raise PtuneError(
                f"{archive}: unsafe archive: {_show(refused.member)} ({refused.why}). Nothing was extracted; "
                "an archive of a data set needs regular files and folders only, inside its own folder"
            ) from None
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, NotImplementedError) as exc:
            raise BrokenArchive(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            if exc.errno is None:  # gzip and bz2 report a damaged stream as an OSError without an errno
                raise BrokenArchive(f"{type(exc).__name__}: {exc}") from None
            raise PtuneError(
                f"{archive}: unpacking into {dest.parent} failed: {exc.strerror} ({exc.filename or ''}); free "
                "disk space or fix the folder's permissions, then rerun"
            ) from None
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
