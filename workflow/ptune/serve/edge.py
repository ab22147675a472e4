"""The network edge of both servers: which names a browser may reach them by (the Host check), which other sites
may call the web page (CORS), and how many connections, for how long (Edge; server.py holds uvicorn to it).

DNS rebinding: a page on attacker.example re-points its own name at 127.0.0.1 (or a LAN address) after it loads,
and its scripts then reach a server on this machine as if it were their own site; the browser still sends
`Host: attacker.example`. So both servers answer only a Host that is an IP address, `localhost`, one of this
machine's own names, the name `--host` gives, or a name listed with `--allowed-hosts` (a reverse proxy's public
name); any other gets 400 before the app sees the request (the page's config and files included). `--allowed-hosts
'*'` turns the check off, for a proxy that checks names itself.

Cross-origin use of the page: a site the user opens may call the page's endpoints with the user's login cookie only
if the page grants that site's origin credentialed CORS. The page grants it to the origins listed with
`--allowed-origins` and no other (its own origin needs no grant: same-origin requests are not subject to CORS).

Only the standard library is imported here at first: `ptune` builds its options from this module on every command.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import PtuneError

ANY = "*"
DEFAULT_MAX_CONNECTIONS = 200
DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_KEEP_ALIVE_S = 5.0
ALLOWED_HOSTS_OPTION = "--allowed-hosts"
ALLOWED_ORIGINS_OPTION = "--allowed-origins"
# A Host header: a name or an IPv4 address, or an IPv6 address in brackets, and an optional port.
_HOST = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::\d{1,5})?")
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_ORIGIN = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:\d{1,5})?")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def split_values(values: Iterable[str]) -> list[str]:
    """An option given several times and/or as a comma-separated list, as one list (blanks dropped)."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@dataclass(frozen=True)
class AllowedHosts:
    """The names a server answers to besides IP addresses; `any`: no Host check at all (`--allowed-hosts '*'`)."""

    names: frozenset[str]
    any: bool = False

    @classmethod
    def for_server(cls, host: str, listed: Iterable[str] = ()) -> AllowedHosts:
        """`localhost`, this machine's own names, `--host` when it is a name, and the names the user listed;
        a listed value that is not a host name is refused, naming it."""
        listed = [v.lower().rstrip(".") if v != ANY else v for v in split_values(listed)]
        for value in listed:
            if value != ANY and not _NAME.fullmatch(value) and not _is_ip(value.strip("[]")):
                raise PtuneError(
                    f"{ALLOWED_HOSTS_OPTION} {value!r}: not a host name; give the bare name a browser or proxy "
                    f"sends in its Host header (e.g. chat.example.com: no scheme, port or path), or {ANY!r} to "
                    "accept any"
                )
        own = {"localhost", socket.gethostname(), socket.getfqdn(), host.strip("[]")}
        names = {n.lower().rstrip(".") for n in own if n and not _is_ip(n)}
        return cls(frozenset(names | {v for v in listed if v != ANY}), ANY in listed)

    def allows(self, header: str | None) -> bool:
        # No Host at all: not a browser (every browser sends one), so not DNS rebinding; HTTP/1.1 requires it anyway.
        if self.any or header is None:
            return True
        match = _HOST.fullmatch(header)
        if match is None:
            return False
        if match["ip6"] is not None:
            return _is_ip(match["ip6"])
        name = match["name"].lower().rstrip(".")
        return _is_ip(name) or name in self.names


class HostCheck:
    """ASGI middleware: a request whose Host is not one `allowed` accepts gets 400 with an OpenAI-shaped JSON error
    (the API's shape, for the page too) naming the host and the option that accepts it."""

    def __init__(self, app, allowed: AllowedHosts):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan; the servers speak no WebSocket (server.py)
            return await self.app(scope, receive, send)
        # Two Host headers (no browser sends them) come out as one value that no name matches.
        host = b", ".join(v for k, v in scope.get("headers") or [] if k == b"host").decode("latin-1") or None
        if self.allowed.allows(host):
            return await self.app(scope, receive, send)
        message = (
            f"this server does not answer to the host name {host[:200]!r} (a guard against DNS rebinding); if that "
            f"is its public name behind a reverse proxy, start it with {ALLOWED_HOSTS_OPTION} NAME"
        )
        body = {
            "error": {"message": message, "type": "invalid_request_error", "param": "Host", "code": "host_not_allowed"},
            "status": 400,
        }
        from starlette.responses import JSONResponse

        await JSONResponse(body, status_code=400)(scope, receive, send)


@dataclass(frozen=True)
class Edge:
    """What a connection to a server may do: the Host names it may use, and the connection limits (server.py)."""

    hosts: AllowedHosts
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S


def allowed_origins(values: Iterable[str]) -> list[str]:
    """The origins listed with --allowed-origins, each checked to be one a browser sends (`https://host[:port]`)."""
    origins = [_normal_origin(v) for v in split_values(values)]
    for origin in origins:
        if origin == ANY:
            raise PtuneError(
                f"{ALLOWED_ORIGINS_OPTION} {ANY!r}: any site the page's users open could then use the model under "
                "their login; list the origins that may call the page, e.g. https://portal.example.com"
            )
        if not _ORIGIN.fullmatch(origin):
            raise PtuneError(
                f"{ALLOWED_ORIGINS_OPTION} {origin!r}: not an origin; give the scheme (http or https), the host and "
                "the port if it is not the scheme's own, without a path, e.g. https://portal.example.com"
            )
    return origins


def _normal_origin(value: str) -> str:
    """An origin as a browser sends it in its Origin header: lower case, no trailing slash, no default port."""
    origin = value.lower().rstrip("/")
    for scheme, port in (("https://", ":443"), ("http://", ":80")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[: -len(port)]
    return origin
