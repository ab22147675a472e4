"""`ptune credentials ram-role`: the temporary credentials of the instance's RAM role, printed as botocore's
`credential_process` reads them, so that the committed AWS config (`.dvc/oss-aws-config`) names a command and never
holds a key.

Where they come from, in this order:
- `$ALIBABA_CLOUD_CREDENTIALS_URI`, when set: a credentials server (Alibaba's `credentials_uri` credential type,
  which its SDKs' default chain also reads). It answers the same JSON as the metadata service.
- the instance metadata service (ECS, and PAI-DSW with an instance RAM role): http://100.100.100.200, or
  `$PTUNE_METADATA_URL` (the tests point it at a stand-in on 127.0.0.1). `latest/meta-data/ram/security-credentials/`
  names the role (or `$ALIBABA_CLOUD_ECS_METADATA` does), and `.../ROLE` answers {AccessKeyId, AccessKeySecret,
  SecurityToken, Expiration, Code}. A metadata token (`PUT latest/api/token`) is asked for first: an instance in
  security hardening mode answers nothing without one; an older one that has no token endpoint is asked without.

botocore turns `Expiration` into refreshable credentials: it runs this command again when fewer than 15 minutes are
left, and waits for it when fewer than 10 are (botocore.credentials: _DEFAULT_ADVISORY_REFRESH_TIMEOUT,
_DEFAULT_MANDATORY_REFRESH_TIMEOUT). So nothing here caches or writes anything: the secrets exist in this process's
memory and on its stdout, which botocore reads, and nowhere else.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from datetime import UTC, datetime
from urllib.parse import quote, urlparse

from ..errors import PtuneError

METADATA_URL_ENV = "PTUNE_METADATA_URL"
METADATA_URL = "http://100.100.100.200"
CREDENTIALS_URI_ENV = "ALIBABA_CLOUD_CREDENTIALS_URI"
ROLE_ENV = "ALIBABA_CLOUD_ECS_METADATA"
ROLES_PATH = "/latest/meta-data/ram/security-credentials/"
TOKEN_PATH = "/latest/api/token"
# The service answers on the instance in milliseconds; off an instance the address leads nowhere, and a command
# that botocore runs must not hang a `dvc push` for long to find that out.
TIMEOUT_S = 2.0
TOKEN_TTL_S = "60"  # the token is used within this command; Alibaba allows 1 to 21600


class CredentialsError(PtuneError):
    """No credentials from the instance: the message says why and what to do."""


def _opener() -> urllib.request.OpenerDirector:
    # Never through a proxy: HTTP(S)_PROXY is for the outside world, and a proxy would see the credentials.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def metadata_url() -> str:
    url = os.environ.get(METADATA_URL_ENV, "").strip() or METADATA_URL
    if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
        raise CredentialsError(f"{METADATA_URL_ENV}={url!r}: must be an http:// URL, e.g. {METADATA_URL}")
    return url.rstrip("/")


def _fetch(url: str, where: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body) of one request; a CredentialsError when nothing answers."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with _opener().open(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read(1 << 16)
    except urllib.error.HTTPError as exc:
        return exc.code, b""  # the body of an error is not needed, and never printed
    except (OSError, ValueError) as exc:  # refused, timed out, no route, a malformed URL
        reason = getattr(exc, "reason", exc)
        raise CredentialsError(
            f"{where} could not be reached in {TIMEOUT_S:g} s ({reason}): this is not an Alibaba Cloud instance with "
            "a RAM role, or its metadata service is off. On the instance: attach a RAM role (PAI-DSW: the "
            "instance's settings, 'RAM role'). Elsewhere: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            f"(they come before this command), or set {METADATA_URL_ENV}"
        ) from None


def _token(base: str) -> dict[str, str]:
    """The metadata token header, or none where the service has no token endpoint (normal mode only)."""
    status, body = _fetch(
        base + TOKEN_PATH,
        f"the instance metadata service ({base})",
        method="PUT",
        headers={"X-aliyun-ecs-metadata-token-ttl-seconds": TOKEN_TTL_S},
    )
    token = body.decode("ascii", "replace").strip()
    if status == 200 and token:
        return {"X-aliyun-ecs-metadata-token": token}
    return {}


def _role(base: str, headers: dict[str, str]) -> str:
    named = os.environ.get(ROLE_ENV, "").strip()
    if named:
        return named
    where = f"the instance metadata service ({base}{ROLES_PATH})"
    status, body = _fetch(base + ROLES_PATH, where, headers=headers)
    roles = [line.strip() for line in body.decode("utf-8", "replace").splitlines() if line.strip()]
    if status == 404 or (status == 200 and not roles):
        raise CredentialsError(
            f"{where}: this instance has no RAM role attached. Attach one that may read and write the bucket "
            "(PAI-DSW: the instance's settings, 'RAM role'; ECS: 'Attach/Detach RAM Role'), or export "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if status != 200:
        raise CredentialsError(f"{where} answered HTTP {status} for the role name")
    return roles[0]


def _parse(body: bytes, where: str) -> dict:
    """botocore's credential_process JSON from the service's answer; errors never quote the answer (secrets)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise CredentialsError(f"{where} answered something that is not JSON") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{where} answered JSON that is not an object")
    if data.get("Code", "Success") != "Success":
        raise CredentialsError(f"{where} answered Code {str(data.get('Code'))[:80]!r}, not 'Success'")
    missing = [k for k in ("AccessKeyId", "AccessKeySecret", "SecurityToken", "Expiration") if not data.get(k)]
    if missing:
        raise CredentialsError(f"{where} answered without {', '.join(missing)}")
    try:
        expires = datetime.fromisoformat(str(data["Expiration"]))
    except ValueError:
        raise CredentialsError(
            f"{where}: Expiration {str(data['Expiration'])[:40]!r} is not an ISO 8601 time"
        ) from None
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)  # Alibaba writes UTC with a Z; without one, UTC is still meant
    if expires <= datetime.now(UTC):
        raise CredentialsError(
            f"{where}: the credentials expired at {expires:%Y-%m-%dT%H:%M:%SZ}; check this machine's clock (`date -u`)"
        )
    return {
        "Version": 1,
        "AccessKeyId": data["AccessKeyId"],
        "SecretAccessKey": data["AccessKeySecret"],
        "SessionToken": data["SecurityToken"],
        "Expiration": expires.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def ram_role() -> tuple[dict, str]:
    """The role's credentials in botocore's credential_process form, and where they came from (no secret in it)."""
    uri = os.environ.get(CREDENTIALS_URI_ENV, "").strip()
    if uri:
        parts = urlparse(uri)  # shown without a query or user:password@, where a server may want a secret
        where = f"{CREDENTIALS_URI_ENV} ({parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"
        where += f"{parts.path})"
        status, body = _fetch(uri, where)
        if status != 200:
            raise CredentialsError(f"{where} answered HTTP {status}")
        return _parse(body, where), where
    base = metadata_url()
    headers = _token(base)
    role = _role(base, headers)
    where = f"the RAM role {role!r} (instance metadata service {base})"
    url = f"{base}{ROLES_PATH}{quote(role, safe='')}"
    status, body = _fetch(url, where, headers=headers)
    if status == 404:
        raise CredentialsError(f"{where}: no such role on this instance; check {ROLE_ENV} or the attached role")
    if status != 200:
        raise CredentialsError(f"{where} answered HTTP {status}")
    return _parse(body, where), where


def run() -> None:
    """Print the credentials for botocore (stdout: the JSON and nothing else)."""
    creds, _ = ram_role()
    print(json.dumps(creds))
