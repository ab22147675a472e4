"""`ptune remote oss` and `ptune remote nas`: one command that makes storage which outlives the instance the
project's default DVC remote, and says how credentials will be found.

Both write through `dvc remote` itself (its entry point, each value one argument, no shell) into `.dvc/config`,
which is committed and so never holds a key. An OSS remote names the committed AWS config `.dvc/oss-aws-config`
(DVC's `configpath`): the S3 settings OSS needs, and the credential helper (`ptune credentials ram-role`,
ptune/remote/credentials.py) that botocore runs when no key is in the environment. A failed step puts
`.dvc/config` back as it was: never a remote half written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import PtuneError
from . import credentials
from .dvc_remote import open_repo, remote_info

DVC_CONFIG = Path(".dvc/config")
# DVC stores configpath relative to .dvc/ and resolves it when it loads the config: a clone anywhere finds it.
AWS_CONFIG = Path(".dvc/oss-aws-config")
# OSS naming rules (Alibaba Cloud, "Bucket naming conventions"): 3-63 characters, lowercase letters, digits and
# hyphens, starting and ending with a letter or a digit.
BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
# Region IDs as OSS writes them: cn-hangzhou, ap-southeast-1, cn-shanghai-finance-1.
REGION = re.compile(r"[a-z]{2}-[a-z]+(-[a-z0-9]+)*")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
PATH_PART = re.compile(r"[A-Za-z0-9._-]+")
# Options of DVC remotes that hold a secret: they belong in .dvc/config.local (`dvc remote modify --local`).
SECRET_OPTIONS = (
    "access_key_id",
    "secret_access_key",
    "session_token",
    "oss_key_id",
    "oss_key_secret",
    "account_key",
    "connection_string",
    "sas_token",
    "client_secret",
    "password",
    "key_passphrase",
)


@dataclass(frozen=True)
class OssRemote:
    name: str
    url: str
    endpoint: str
    region: str


def _check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise PtuneError(f"--name {name!r}: a DVC remote name is letters, digits, '_' and '-' (e.g. oss)")


def oss_remote(bucket: str, region: str, path: str, name: str, internal: bool, endpoint: str | None) -> OssRemote:
    """The remote these arguments describe, every value checked before anything is written."""
    _check_name(name)
    if not BUCKET.fullmatch(bucket):
        raise PtuneError(
            f"--bucket {bucket!r}: not an OSS bucket name (3-63 characters: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit). Give the bare name, e.g. my-ptune-store, not oss:// or a URL"
        )
    if region.startswith("oss-") or ".aliyuncs.com" in region:
        raise PtuneError(f"--region {region!r}: give the region ID, e.g. cn-hangzhou, not the endpoint")
    if len(region) > 40 or not REGION.fullmatch(region):
        raise PtuneError(
            f"--region {region!r}: not an Alibaba Cloud region ID (e.g. cn-hangzhou, cn-beijing, ap-southeast-1; "
            "the bucket's overview page in the OSS console shows it)"
        )
    parts = path.strip("/").split("/")
    if not path.strip("/") or any(p in (".", "..") or not PATH_PART.fullmatch(p) for p in parts):
        raise PtuneError(
            f"--path {path!r}: a folder inside the bucket, as names of letters, digits, '.', '_' and '-' "
            "separated by '/' (e.g. ptune or projects/ptune)"
        )
    if endpoint is None:
        endpoint = f"https://oss-{region}{'-internal' if internal else ''}.aliyuncs.com"
    elif not re.fullmatch(r"https://[A-Za-z0-9.-]+(:[0-9]+)?/?", endpoint):
        # Plain http would send every object (and the request signatures) in the clear.
        raise PtuneError(
            f"--endpoint {endpoint!r}: must be https://HOST[:PORT], e.g. https://oss-{region}.aliyuncs.com"
        )
    return OssRemote(name, f"s3://{bucket}/{'/'.join(parts)}", endpoint.rstrip("/"), region)


def _dvc(*args: str) -> None:
    """`dvc ARGS`, in this process (the `dvc` command's own entry point: one import for all the steps)."""
    from dvc.cli import main

    if main(list(args)) != 0:
        raise PtuneError(f"`dvc {' '.join(args)}` failed (DVC's message is above); .dvc/config is as it was")


def _write(steps: list[tuple[str, ...]]) -> None:
    """Run the `dvc` commands; if one fails, put .dvc/config back as it was before the first."""
    if not DVC_CONFIG.is_file():
        raise PtuneError(f"{Path.cwd()}: no {DVC_CONFIG} here; run `ptune remote` in the project's root")
    before = DVC_CONFIG.read_bytes()
    try:
        for step in steps:
            _dvc(*step)
    except BaseException:
        DVC_CONFIG.write_bytes(before)
        raise


def local_secrets(name: str) -> list[str]:
    """The secret options that .dvc/config.local holds for remote `name` (their names only)."""
    with open_repo() as repo:
        conf = repo.config.load_one("local").get("remote", {}).get(name, {})
    return [key for key in SECRET_OPTIONS if conf.get(key)]


def credential_source(name: str) -> tuple[bool, str]:
    """Where the S3 client will take the remote's credentials from, in botocore's order, and whether it found any.
    Says where, never what: no key, secret or token is ever in the text."""
    local = local_secrets(name)
    if local:
        return True, f"the remote's {', '.join(local)} in .dvc/config.local (`dvc remote modify --local`)"
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return True, "the environment's AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (they come before the RAM role)"
    try:
        creds, where = credentials.ram_role()
    except credentials.CredentialsError as exc:
        return False, (
            f"none found. The environment has no AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, and the RAM role "
            f"gave none: {exc}"
        )
    return True, (
        f"{where}, through `ptune credentials ram-role` (the credential_process of {AWS_CONFIG}); these expire "
        f"{creds['Expiration']} and botocore fetches new ones before they do"
    )


def setup_oss(remote: OssRemote) -> str:
    """Write the remote (the default one) and say what was done and how credentials will be found."""
    if not AWS_CONFIG.is_file():
        raise PtuneError(
            f"{AWS_CONFIG} is missing: it is part of the project (the S3 settings OSS needs); restore it with "
            f"`git checkout -- {AWS_CONFIG}`"
        )
    _write(
        [
            ("remote", "add", "--default", "--force", remote.name, remote.url),
            ("remote", "modify", remote.name, "endpointurl", remote.endpoint),
            ("remote", "modify", remote.name, "region", remote.region),
            ("remote", "modify", remote.name, "configpath", str(AWS_CONFIG)),
        ]
    )
    found, how = credential_source(remote.name)
    lines = [
        f"DVC remote '{remote.name}' (the default): {remote.url} at {remote.endpoint}, S3 settings from {AWS_CONFIG}",
        f"credentials: {how}",
    ]
    if not found:
        lines.append(
            "what to do: attach a RAM role to the instance, or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            f"or keep keys in the uncommitted .dvc/config.local: `dvc remote modify --local {remote.name} "
            f"access_key_id ID` and `dvc remote modify --local {remote.name} secret_access_key SECRET`; never in "
            ".dvc/config, which is committed. Then `ptune doctor --remote-roundtrip`"
        )
    lines += [
        "next: `git add .dvc/config && git commit -m 'DVC remote: OSS'`, then `ptune doctor --remote-roundtrip` "
        "and `ptune push`",
    ]
    return "\n".join(lines)


class _Proposed:
    """What remote_info reads of a repo (its config), for a remote not written yet: the one check of whether a
    directory outlives the instance, applied before anything changes."""

    def __init__(self, name: str, url: str):
        self.config = {"core": {"remote": name}, "remote": {name: {"url": url}}}


def setup_nas(path: str, name: str) -> str:
    """A directory on a mounted NAS (or OSS bucket) as the default remote; refused on the instance's own disks."""
    _check_name(name)
    folder = Path(path).expanduser()
    if not folder.is_absolute():
        raise PtuneError(f"{path}: give the absolute path of a folder on the mount, e.g. /mnt/data/ptune-dvc-storage")
    info = remote_info(_Proposed(name, str(folder)))
    if info.same_disk:
        raise PtuneError(
            f"{folder} is on the filesystem mounted at {info.mount_point}, which is this workspace's (or the "
            "system's) disk: it goes with the instance, and a remote there saves nothing. Mount a NAS or OSS "
            "bucket on the instance (PAI-DSW: the instance's storage settings, e.g. at /mnt/data) and give a folder "
            "on it, or use `ptune remote oss`"
        )
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise PtuneError(f"{folder}: {existing} is not writable by this user; `dvc push` could not write there")
    _write([("remote", "add", "--default", "--force", name, str(folder))])
    return "\n".join(
        [
            f"DVC remote '{name}' (the default): {folder}, on the filesystem mounted at {info.mount_point}",
            f"next: `git add .dvc/config && git commit -m 'DVC remote: {name}'` (every instance must mount it at "
            "the same path), then `ptune doctor --remote-roundtrip` and `ptune push`",
        ]
    )
