"""A stand-in for an Alibaba Cloud instance's metadata service (http://100.100.100.200) on 127.0.0.1: what
`ptune credentials ram-role` asks for a RAM role's temporary credentials.

What it serves, as ECS documents it ("Instance metadata"; "Obtain temporary credentials of an instance RAM role"):
- `PUT /latest/api/token` with `X-aliyun-ecs-metadata-token-ttl-seconds` (1-21600) -> a token; a TTL out of range
  -> 400. In security hardening mode (`hardened`), every GET without a valid `X-aliyun-ecs-metadata-token` -> 403,
  and a wrong token -> 401.
- `GET /latest/meta-data/ram/security-credentials/` -> the role's name; 404 without a role.
- `GET /latest/meta-data/ram/security-credentials/ROLE` -> {AccessKeyId, AccessKeySecret, SecurityToken, Expiration,
  LastUpdated, Code}; the next credentials of `issued` at each request (the service hands out new ones as the old
  ones near their end), or `body` as it is (a broken answer).
- `GET /credentials` -> the same JSON: a credentials server as ALIBABA_CLOUD_CREDENTIALS_URI names one.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler

from support.http_files import LoopbackServer

ROLES = "/latest/meta-data/ram/security-credentials/"


def credentials(valid_for: timedelta, n: int = 0) -> dict:
    """One set of temporary credentials, as the service writes them (made here: the values mean nothing)."""
    now = datetime.now(UTC).replace(microsecond=0)
    return {
        "AccessKeyId": f"STS.stand-in-key-{n}",
        "AccessKeySecret": f"stand-in-secret-{n}-{secrets.token_hex(8)}",
        "SecurityToken": f"stand-in-token-{n}-{secrets.token_hex(16)}",
        "Expiration": (now + valid_for).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "Code": "Success",
    }


class MetadataService(LoopbackServer):
    def __init__(self):
        super().__init__(_Handler)
        self.reset()

    def reset(self, role: str | None = "ptune-oss-role", hardened: bool = True, body: bytes | None = None) -> None:
        """Back to a role with fresh credentials (valid 6 hours, as ECS issues them)."""
        with self.lock:
            self.role = role
            self.hardened = hardened
            self.body = body  # answered for the role instead of credentials, when set
            self.issued = [credentials(timedelta(hours=6))]
            self.tokens: set[str] = set()
            self.requests: list[str] = []  # "METHOD path"

    @property
    def url(self) -> str:
        return self.origin

    def credential_requests(self) -> int:
        return sum(1 for r in self.requests if r.startswith("GET ") and r != f"GET {ROLES}" and "/api/" not in r)


class _Handler(BaseHTTPRequestHandler):
    server: MetadataService

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", kind: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests.append(f"PUT {self.path}")
        if self.path != "/latest/api/token":
            return self._send(404)
        ttl = self.headers.get("X-aliyun-ecs-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self._send(400, b"Missing or Invalid Parameters")
        token = secrets.token_urlsafe(24)
        with srv.lock:
            srv.tokens.add(token)
        self._send(200, token.encode())

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests.append(f"GET {self.path}")
            token = self.headers.get("X-aliyun-ecs-metadata-token")
            if self.path != "/credentials":  # a credentials server takes no metadata token
                if token is not None and token not in srv.tokens:
                    return self._send(401)
                if srv.hardened and token is None:
                    return self._send(403)
            if self.path == ROLES:
                return self._send(200, srv.role.encode()) if srv.role else self._send(404)
            if self.path == "/credentials" or (srv.role and self.path == ROLES + srv.role):
                if srv.body is not None:
                    return self._send(200, srv.body, "application/json")
                current = srv.issued.pop(0) if len(srv.issued) > 1 else srv.issued[0]
                return self._send(200, json.dumps(current).encode(), "application/json")
        self._send(404)
