"""Setting the remote up on an instance: the RAM role's credentials through botocore's credential_process
(`ptune credentials ram-role`), `ptune remote oss` / `ptune remote nas`, and what `ptune doctor` says about keys,
credentials, the instance's disk and a round trip through the remote.

The instance's metadata service is a stand-in on 127.0.0.1 (tests/support/metadata_stand_in.py), in security
hardening mode unless a test says otherwise; nothing here reaches 100.100.100.200 or any other outside address.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest

from conftest import REPO, Project
from support.metadata_stand_in import MetadataService, credentials

AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE")


@pytest.fixture(scope="module")
def metadata_service():
    with MetadataService() as service:
        yield service


@pytest.fixture
def metadata(metadata_service):
    metadata_service.reset()
    return metadata_service


@pytest.fixture
def role_env(env, metadata) -> dict[str, str]:
    """An instance with a RAM role and no key in the environment: the commands' environment."""
    out = {k: v for k, v in env.items() if k not in AWS_KEYS}
    out.pop("ALIBABA_CLOUD_CREDENTIALS_URI", None)
    out.pop("ALIBABA_CLOUD_ECS_METADATA", None)
    return {**out, "PTUNE_METADATA_URL": metadata.url}


def _helper(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ptune", "credentials", "ram-role"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_credential_helper_prints_the_roles_credentials_as_botocore_reads_them(metadata, role_env, tmp_path):
    issued = metadata.issued[0]
    proc = _helper(role_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "Version": 1,
        "AccessKeyId": issued["AccessKeyId"],
        "SecretAccessKey": issued["AccessKeySecret"],
        "SessionToken": issued["SecurityToken"],
        "Expiration": issued["Expiration"],
    }
    assert proc.stderr == ""
    # Security hardening mode: a token first, then the role's name, then its credentials.
    assert metadata.requests == [
        "PUT /latest/api/token",
        "GET /latest/meta-data/ram/security-credentials/",
        "GET /latest/meta-data/ram/security-credentials/ptune-oss-role",
    ]

    # A role named by ALIBABA_CLOUD_ECS_METADATA is not looked up; a credentials server (ALIBABA_CLOUD_CREDENTIALS_URI)
    # comes before the metadata service.
    metadata.reset(hardened=False)
    proc = _helper({**role_env, "ALIBABA_CLOUD_ECS_METADATA": "ptune-oss-role"}, tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["AccessKeyId"] == metadata.issued[0]["AccessKeyId"]
    assert "GET /latest/meta-data/ram/security-credentials/" not in metadata.requests
    metadata.reset()
    proc = _helper({**role_env, "ALIBABA_CLOUD_CREDENTIALS_URI": metadata.url + "/credentials"}, tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["SessionToken"] == metadata.issued[0]["SecurityToken"]
    assert metadata.requests == ["GET /credentials"]


def _silent_port():
    """A port that accepts connections and never answers (a firewall that drops, a hung service)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def test_credential_helper_fails_clearly_without_a_role_or_a_service(metadata, role_env, tmp_path):
    def failure(env) -> str:
        proc = _helper(env, tmp_path)
        assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout)
        assert proc.stderr.startswith("ptune: error: ") and "Traceback" not in proc.stderr
        return proc.stderr

    metadata.reset(role=None)
    err = failure(role_env)
    assert "no RAM role attached" in err and metadata.url in err and "AWS_ACCESS_KEY_ID" in err

    leaked = credentials(timedelta(hours=1))
    metadata.reset(body=json.dumps(leaked).encode()[:-3])  # cut short
    err = failure(role_env)
    assert "not JSON" in err and leaked["AccessKeySecret"] not in err
    metadata.reset(body=json.dumps({**leaked, "Code": "RoleNotAuthorized"}).encode())
    err = failure(role_env)
    assert "'RoleNotAuthorized'" in err and leaked["SecurityToken"] not in err
    metadata.reset(body=json.dumps({**leaked, "Expiration": "2001-01-01T00:00:00Z"}).encode())
    assert "expired at 2001-01-01T00:00:00Z" in failure(role_env)

    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    err = failure({**role_env, "PTUNE_METADATA_URL": closed})
    assert f"the instance metadata service ({closed})" in err and "could not be reached" in err
    with _silent_port() as silent:
        began = time.monotonic()
        err = failure({**role_env, "PTUNE_METADATA_URL": f"http://127.0.0.1:{silent.getsockname()[1]}"})
        assert "timed out" in err and time.monotonic() - began < 10  # 2 s, plus starting Python
    assert "must be an http:// URL" in failure({**role_env, "PTUNE_METADATA_URL": "ftp://127.0.0.1"})


def test_botocore_runs_the_helper_from_the_committed_config_and_renews_before_expiry(
    metadata, role_env, tmp_path, monkeypatch
):
    """A real botocore session, reading the project's committed AWS config, as dvc-s3 makes it read it."""
    import botocore.session

    home = tmp_path / "home"  # no ~/.aws of any real HOME
    home.mkdir()
    for name in AWS_KEYS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", role_env["PATH"])  # `ptune`: the venv's
    monkeypatch.setenv("PTUNE_METADATA_URL", metadata.url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(REPO / ".dvc" / "oss-aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never AWS's own metadata address

    # The service hands out credentials 5 minutes from their end, then fresh ones: inside botocore's mandatory
    # refresh window (10 minutes), so it runs the helper again before it signs anything.
    metadata.issued = [credentials(timedelta(minutes=5), 1), credentials(timedelta(hours=6), 2)]
    creds = botocore.session.Session().get_credentials()
    assert creds.method == "custom-process"
    frozen = creds.get_frozen_credentials()
    assert frozen.access_key == "STS.stand-in-key-2" and frozen.token.startswith("stand-in-token-2-")
    assert metadata.credential_requests() == 2
    # Fresh ones last: no further run of the helper while they are valid.
    creds.get_frozen_credentials()
    assert metadata.credential_requests() == 2

    # Keys in the environment come first: the helper is not run at all.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-environment")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")
    metadata.reset()
    creds = botocore.session.Session().get_credentials()
    assert creds.method == "env" and creds.access_key == "from-the-environment"
    assert metadata.requests == []


def _dvc_project(root: Path, env: dict[str, str]) -> Project:
    """The project's DVC and git setup alone (no pipeline): what `ptune remote` edits."""
    (root / ".dvc").mkdir(parents=True)
    for name in ("config", "oss-aws-config", ".gitignore"):
        shutil.copy2(REPO / ".dvc" / name, root / ".dvc" / name)
    project = Project(root, env)
    project.run("git", "init", "-q")
    return project


def _dvc_config(project: Project) -> dict[str, str]:
    """Every setting DVC reads for the project (`dvc config --list`), as key -> value."""
    lines = project.run("dvc", "config", "--list").stdout.splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


@pytest.mark.parametrize(
    "args, says",
    [
        ({"bucket": "My_Bucket"}, "--bucket 'My_Bucket': not an OSS bucket name"),
        ({"bucket": "ab"}, "--bucket 'ab': not an OSS bucket name"),
        ({"bucket": "oss://ptune-store"}, "not oss:// or a URL"),
        ({"region": "oss-cn-hangzhou"}, "give the region ID, e.g. cn-hangzhou, not the endpoint"),
        ({"region": "Hangzhou"}, "not an Alibaba Cloud region ID"),
        ({"path": "runs/../.."}, "--path 'runs/../..': a folder inside the bucket"),
        ({"path": "/"}, "--path '/': a folder inside the bucket"),
        ({"endpoint": "http://oss-cn-hangzhou.aliyuncs.com"}, "must be https://HOST[:PORT]"),
        ({"name": "my remote"}, "--name 'my remote'"),
    ],
)
def test_remote_oss_refuses_what_oss_or_dvc_would_not_take(args, says):
    from ptune.errors import PtuneError
    from ptune.remote import configure

    given = {"bucket": "ptune-store", "region": "cn-hangzhou", "path": "ptune", "name": "oss", "internal": False,
             "endpoint": None, **args}  # fmt: skip
    with pytest.raises(PtuneError, match=None) as raised:
        configure.oss_remote(**given)
    assert says in str(raised.value)


def test_remote_oss_writes_the_default_remote_and_says_where_credentials_come_from(metadata, role_env, tmp_path):
    p = _dvc_project(tmp_path / "project", role_env)
    before = (p.root / ".dvc/config").read_bytes()
    proc = p.run("ptune", "remote", "oss", "--bucket", "My_Bucket", "--region", "cn-hangzhou", check=False)
    assert proc.returncode == 2 and "ptune: error: --bucket 'My_Bucket'" in proc.stderr
    assert (p.root / ".dvc/config").read_bytes() == before

    out = p.run("ptune", "remote", "oss", "--bucket", "ptune-store", "--region", "cn-hangzhou", "--internal").stdout
    assert "DVC remote 'oss' (the default): s3://ptune-store/ptune at https://oss-cn-hangzhou-internal" in out
    assert "credentials: the RAM role 'ptune-oss-role'" in out and "ptune credentials ram-role" in out
    assert metadata.issued[0]["AccessKeySecret"] not in out and metadata.issued[0]["SecurityToken"] not in out
    conf = _dvc_config(p)
    assert conf["core.remote"] == "oss" and conf["remote.oss.url"] == "s3://ptune-store/ptune"
    assert conf["remote.oss.endpointurl"] == "https://oss-cn-hangzhou-internal.aliyuncs.com"
    assert conf["remote.oss.region"] == "cn-hangzhou"
    # Stored relative to .dvc/ (so a clone anywhere finds it), resolved by DVC whatever the working directory.
    assert conf["remote.oss.configpath"] == str(p.root / ".dvc/oss-aws-config")
    assert "configpath = oss-aws-config" in (p.root / ".dvc/config").read_text()

    # Keys in the environment: they come first, and the remote says so.
    env_keys = {**role_env, "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "example-secret"}
    proc = subprocess.run(
        ["ptune", "remote", "oss", "--bucket", "ptune-store", "--region", "cn-beijing", "--path", "team/ptune"],
        cwd=p.root, env=env_keys, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "the environment's AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in proc.stdout
    assert "AKIDEXAMPLE" not in proc.stdout and "example-secret" not in proc.stdout

    # Neither: the remote is written all the same, and the output says what to do.
    metadata.reset(role=None)
    out = p.run("ptune", "remote", "oss", "--bucket", "ptune-store", "--region", "cn-hangzhou").stdout
    assert "credentials: none found" in out and "no RAM role attached" in out and "what to do:" in out
    assert "dvc remote modify --local oss access_key_id" in out
    assert "secret" not in (p.root / ".dvc/config").read_text().lower()


def test_remote_nas_refuses_the_workspace_disk(role_env, tmp_path):
    p = _dvc_project(tmp_path / "project", role_env)
    before = (p.root / ".dvc/config").read_bytes()
    proc = p.run("ptune", "remote", "nas", str(tmp_path / "storage"), check=False)
    assert proc.returncode == 2 and "goes with the instance" in proc.stderr and "ptune remote oss" in proc.stderr
    proc = p.run("ptune", "remote", "nas", "storage", check=False)
    assert proc.returncode == 2 and "give the absolute path of a folder on the mount" in proc.stderr
    assert (p.root / ".dvc/config").read_bytes() == before

    shm = Path("/dev/shm")  # a filesystem of its own (tmpfs), as a NAS mount is
    if not (shm.is_dir() and os.access(shm, os.W_OK)) or shm.stat().st_dev in (
        os.stat("/").st_dev,
        p.root.stat().st_dev,
    ):
        pytest.skip("no writable filesystem here other than the workspace's and the system's")
    target = shm / f"ptune-nas-{os.getpid()}-{time.monotonic_ns()}" / "ptune-dvc-storage"
    out = p.run("ptune", "remote", "nas", str(target)).stdout
    assert f"DVC remote 'nas' (the default): {target}, on the filesystem mounted at {shm}" in out
    conf = _dvc_config(p)
    assert conf["core.remote"] == "nas" and conf["remote.nas.url"] == str(target)


def test_doctor_flags_committed_keys_says_when_the_disk_goes_and_round_trips(ran_project):
    # On PAI-DSW, whose instances carry DSW_INSTANCE_ID (elsewhere: tests/test_presets_doctor.py).
    p = Project(ran_project.root, {**ran_project.env, "DSW_INSTANCE_ID": "dsw-test-instance"})
    secret = "doctor-planted-" + os.urandom(6).hex()
    p.run("dvc", "remote", "add", "store", "s3://ptune-store/ptune")
    p.run("dvc", "remote", "modify", "store", "secret_access_key", secret)  # committed: the mistake
    p.run("dvc", "remote", "modify", "store", "configpath", ".dvc/oss-aws-config")
    aws_config = p.root / ".dvc/oss-aws-config"
    aws_config.write_text(aws_config.read_text() + f"aws_secret_access_key = {secret}\n")
    proc = p.run("ptune", "doctor", "--remote-roundtrip", check=False, timeout=300)
    out = proc.stdout
    assert "PROBLEM  secrets: .dvc/config (committed, in every clone) holds secret_access_key of remote 'store'" in out
    assert "dvc remote modify --local store secret_access_key VALUE" in out and "RAM role" in out
    assert "PROBLEM  secrets: .dvc/oss-aws-config (remote 'store''s AWS config, committed) holds" in out
    assert secret not in out and secret not in proc.stderr
    assert (
        "ok       instance disk: PAI-DSW instance dsw-test-instance: PAI-DSW wipes an instance's disk when the "
        "instance is deleted; in a public resource group also after it has been stopped for 15 days, in a dedicated "
        "resource group at every stop" in out
    )
    assert "ok       remote round trip: 4096 bytes written, found, read back byte for byte and deleted on local" in out
    assert not any((p.root.parent / "ptune-dvc-storage").rglob("*.bin"))
    assert proc.returncode == 1 and out.rstrip().endswith("3 problem(s)")


@pytest.mark.slow
def test_doctor_round_trips_through_the_oss_stand_in_on_the_ram_roles_credentials(
    ran_project, metadata, role_env, tmp_path
):
    """The whole route on an instance with a RAM role and no key anywhere: `ptune remote oss`, then doctor's round
    trips (4 KiB, and 101 MiB: multipart) through DVC -> s3fs -> botocore, whose credential_process runs
    `ptune credentials ram-role` against the metadata stand-in, over HTTPS to the OSS stand-in in front of moto."""
    import boto3

    from support.oss_stand_in import ENDPOINT, REGION, OssStandIn, moto_s3

    with moto_s3(role_env) as s3, OssStandIn(s3, tmp_path / "certs") as oss:
        bucket = boto3.client(
            "s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
        )
        bucket.create_bucket(Bucket="ptune-store")
        p = Project(ran_project.root, {**role_env, **oss.client_env()})
        out = p.run("ptune", "remote", "oss", "--bucket", "ptune-store", "--region", REGION, "--endpoint", ENDPOINT)
        assert "credentials: the RAM role 'ptune-oss-role'" in out.stdout
        proc = p.run("ptune", "doctor", "--remote-roundtrip", "--large", check=False, timeout=900)
        out = proc.stdout
        assert "ok       dvc remote: oss (s3://ptune-store/ptune) reachable" in out, out + proc.stderr
        assert "ok       credentials: remote 'oss': the RAM role 'ptune-oss-role'" in out
        assert "ok       remote round trip: 4096 bytes written, found, read back byte for byte and deleted" in out
        assert "ok       remote round trip: 101.0 MiB written, found, read back byte for byte and deleted" in out
        assert oss.refused == [] and oss.tunnels_refused == []
        assert any(method == "POST" and "uploads" in path for method, _, path, _ in oss.requests)  # multipart
        assert all(host == f"ptune-store.{ENDPOINT.split('//')[1]}" for _, host, _, _ in oss.requests)
        assert metadata.credential_requests() >= 1
        assert bucket.list_objects_v2(Bucket="ptune-store").get("KeyCount") == 0  # nothing left behind
        issued = metadata.issued[0]
        for secret in (issued["AccessKeySecret"], issued["SecurityToken"]):
            assert secret not in out and secret not in proc.stderr
