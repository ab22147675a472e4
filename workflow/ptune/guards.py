"""Checks of outside values that reach git's command line or the network, each written once: params loading
(config.py) refuses a bad value before any stage starts, and the source that uses it (sources/git_lfs.py,
sources/url.py) checks it again where it is used (a redirect is a new URL). Standard library only: this sits
below the params and the sources, which both import it.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")

# Defaults of fetch_data.max_unpacked_bytes and max_archive_members: ADGEN unpacks to well under 1 GiB in 3 files.
DEFAULT_MAX_BYTES = 8 << 30
DEFAULT_MAX_MEMBERS = 100_000


def is_loopback(host: str | None) -> bool:
    """This machine: `localhost` or a loopback address (127.0.0.0/8, ::1), where nobody sits on the way."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_problem(url: str, allow_http: bool) -> str | None:
    """Why `url` may not be downloaded from, or None: https, or http to this machine or with allow_http."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    scheme = parts.scheme.lower()
    if scheme == "https" or (scheme == "http" and (allow_http or is_loopback(host))):
        return None
    if scheme == "http":
        return (
            "plain http, which anyone on the way can read and replace; use the https:// address, or set "
            "fetch_data.allow_http: true if this server has no https and you accept that"
        )
    return f"the scheme {scheme or '(none)'!r}: only https:// (and http:// with fetch_data.allow_http) is fetched"


def revision_problem(revision: str) -> str | None:
    """Why `revision` is not a commit hash or a valid ref name (git's check-ref-format rules, one level allowed,
    plus no leading `-`), or None. The one check of fetch_weights.revision: params loading and fetch both call it,
    since the value reaches git's command line and git's revision syntax (`a..b`, `x^{...}`, `@{...}`) is not wanted.
    """
    if re.fullmatch(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}", revision):
        return None
    if not revision:
        return "it is empty"
    if revision.startswith("-"):
        return "it starts with '-', which git reads as an option"
    if _REF_FORBIDDEN.search(revision):
        return "it holds a space, a control character or one of ~ ^ : ? * [ \\"
    if ".." in revision or "@{" in revision or revision == "@":
        return "it holds '..' or '@{', or is '@'"
    if revision.startswith("/") or revision.endswith(("/", ".")) or "//" in revision:
        return "it starts or ends with '/', ends with '.' or holds '//'"
    if any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        return "a part of it starts with '.' or ends with '.lock'"
    return None
