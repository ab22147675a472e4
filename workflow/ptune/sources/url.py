"""Source `url`: an HTTPS download that resumes with Range requests, checked against a required sha256,
then unpacked (tar, tar.gz, zip) through archive.safe_extract: e.g. AdvertiseGen.tar.gz → AdvertiseGen/train.json,
dev.json.

Plain http is refused (url_problem) unless the host is this machine or fetch_data.allow_http is set: what comes
over it can be read and replaced on the way, and a first run with an empty fetch_data.sha256 would show the user
the checksum of whatever an attacker sent. The same rule applies to every redirect the server answers with.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import PtuneError
from ..guards import DEFAULT_MAX_BYTES, DEFAULT_MAX_MEMBERS, url_problem
from . import archive as archive_check

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a new URL: https://good/x answering 302 to http://elsewhere/x must not downgrade the fetch."""

    def __init__(self, allow_http: bool):
        super().__init__()
        self.allow_http = allow_http

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        why = url_problem(newurl, self.allow_http)
        if why:
            raise PtuneError(f"fetch_data.url: {req.full_url} redirects (HTTP {code}) to {newurl}, refused: {why}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _get(url: str, part: Path, timeout_s: float, allow_http: bool) -> None:
    """One request: continue `part` from where it ends (Range), or start it over if the server ignores that."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    request = urllib.request.Request(url, headers={"User-Agent": "ptune", **headers})
    opener = urllib.request.build_opener(_CheckedRedirects(allow_http))
    with opener.open(request, timeout=timeout_s) as resp:
        if have and resp.status == 206:
            start = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if start != str(have):
                part.unlink()  # the next try starts over: this server cannot be trusted to resume
                raise http.client.HTTPException(f"server resumed at byte {start!r}, not {have}")
            mode = "ab"
            log.info("resuming %s at byte %d", url, have)
        else:
            mode = "wb"
        expected = resp.headers.get("Content-Length")
        written = 0
        with open(part, mode) as fh:
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                written += len(chunk)
        if expected is not None and written != int(expected):
            raise http.client.IncompleteRead(b"", int(expected) - written)


def download(
    url: str,
    dest: Path,
    sha256: str,
    attempts: int = 5,
    backoff_s: float = 5.0,
    timeout_s: float = 60.0,
    allow_http: bool = False,
) -> None:
    """Download `url` to `dest`, resuming a partial `dest`.part left by an earlier try or run, and check it.

    Retries with exponential backoff on dropped connections, timeouts and 5xx answers; fails at once on other
    HTTP errors. With `sha256` empty the download is kept but refused, the message giving its sha256 to check.
    A URL (or a redirect) that url_problem refuses fails before any request to it.
    """
    why = url_problem(url, allow_http)
    if why:
        raise PtuneError(f"fetch_data.url: {url} is refused: {why}")
    sha256 = sha256.lower()
    if not dest.is_file():
        _fetch(url, dest, attempts, backoff_s, timeout_s, allow_http)
    actual = _sha256(dest)
    size = dest.stat().st_size
    if not sha256:
        raise PtuneError(
            f"fetch_data.sha256 is empty, so {url} is not used unchecked: the download ({size:,} "
            f"bytes, kept in {dest}) has sha256 {actual}. Check that it is the file you expect, set "
            f"fetch_data.sha256: {actual} in params.yaml and rerun (nothing is downloaded again)"
        )
    if actual != sha256:
        dest.unlink()
        raise PtuneError(
            f"fetch_data.sha256: {url} ({size:,} bytes) has sha256 {actual}, expected {sha256}; "
            "the download was removed. If the file changed upstream on purpose, check it and set "
            "fetch_data.sha256 to the new value"
        )


def _fetch(url: str, dest: Path, attempts: int, backoff_s: float, timeout_s: float, allow_http: bool) -> None:
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    error = ""
    for attempt in range(attempts):
        try:
            _get(url, part, timeout_s, allow_http)
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and part.exists():
                break  # nothing left to send: the partial file is already whole
            if exc.code < 500 and exc.code not in (408, 429):
                raise PtuneError(
                    f"fetch_data.url: {url} answered HTTP {exc.code} {exc.reason}; check the URL"
                ) from None
            error = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            error = str(getattr(exc, "reason", exc)) or type(exc).__name__
        have = part.stat().st_size if part.exists() else 0
        log.warning(
            "download of %s interrupted at %d bytes (attempt %d of %d): %s", url, have, attempt + 1, attempts, error
        )
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    else:
        have = part.stat().st_size if part.exists() else 0
        raise PtuneError(
            f"fetch_data.url: downloading {url} failed {attempts} times (last: {error}); rerun to "
            f"resume from the {have:,} bytes already in {part}"
        )
    os.replace(part, dest)


def _describe(path: Path) -> str:
    head = path.read_bytes()[:64] if path.stat().st_size else b""
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a login or error page instead of the file?)"
    return f"starts with {head[:16]!r}"


def extract(
    archive: Path, dest: Path, max_bytes: int = DEFAULT_MAX_BYTES, max_members: int = DEFAULT_MAX_MEMBERS
) -> Path:
    """Unpack a tar (any compression) or zip archive into `dest` through archive.safe_extract (which refuses
    links, names leading out of `dest` and bombs, leaving nothing); returns the data root.

    The root is the archive's single top-level folder if it has one (AdvertiseGen/), else `dest` itself.
    """
    if archive_check.kind(archive) is None:
        raise PtuneError(
            f"{archive}: not a tar or zip archive ({archive.stat().st_size:,} bytes, "
            f"{_describe(archive)}); fetch_data.url must point at an archive such as "
            "AdvertiseGen.tar.gz"
        )
    try:
        archive_check.safe_extract(archive, dest, max_bytes, max_members)
    except archive_check.BrokenArchive as exc:
        raise PtuneError(
            f"{archive}: the archive is truncated or corrupt ({exc}), though its "
            "sha256 is the expected one: the file at fetch_data.url is broken, or fetch_data.sha256 "
            f"was taken from a broken download; delete {archive}, check the checksum and rerun"
        ) from None
    entries = list(dest.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest
