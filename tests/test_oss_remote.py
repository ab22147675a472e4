"""Alibaba OSS through its S3-compatible endpoint, for real: `dvc` and `ptune` (DVC's S3 remote: s3fs, botocore)
against a stand-in that refuses what OSS refuses (tests/support/oss_stand_in.py), in front of moto's S3 server.

The remote is set up as `ptune remote oss` sets it up: `s3://BUCKET/PREFIX`, the endpoint over https, and
`configpath` naming the committed `.dvc/oss-aws-config`. Nothing leaves 127.0.0.1: the endpoint's name is under
`.test` and never resolved (the client reaches it through HTTPS_PROXY, the stand-in), and its certificate comes from
a CA made for the test run, trusted through AWS_CA_BUNDLE.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, Project
from support.oss_stand_in import ENDPOINT, ENDPOINT_HOST, REGION, OssStandIn, moto_s3

BUCKET = "ptune-bucket"
AWS_CONFIG = ".dvc/oss-aws-config"
PREFIX = "models/ptuning/prefix.safetensors"


@pytest.fixture(scope="module")
def oss(tmp_path_factory, env):
    """moto's S3 server with one bucket, the OSS stand-in in front of it, and the environment of a client of OSS."""
    import boto3

    clean = {k: v for k, v in env.items() if not k.upper().startswith(("AWS_", "HTTP_PROXY", "HTTPS_PROXY"))}
    with moto_s3(clean) as url, OssStandIn(url, tmp_path_factory.mktemp("oss-certs")) as stand_in:
        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        s3.create_bucket(Bucket=BUCKET)
        client_env = {
            **clean,
            **stand_in.client_env(),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        yield SimpleNamespace(stand_in=stand_in, s3=s3, env=client_env)


@pytest.fixture
def refused(oss):
    """The OSS errors the stand-in sends during one test (none, where the settings are right)."""
    before = len(oss.stand_in.refused)
    yield lambda: oss.stand_in.refused[before:]
    oss.stand_in.lose_uploads_of.clear()


def _use_oss(project: Project, prefix: str) -> None:
    """The remote `ptune remote oss --bucket ptune-bucket --region cn-hangzhou --path PREFIX` writes, with the
    stand-in's endpoint; `configpath` as given from the project's root, which DVC stores relative to .dvc/."""
    project.run("dvc", "remote", "add", "-d", "-f", "oss", f"s3://{BUCKET}/{prefix}")
    project.run("dvc", "remote", "modify", "oss", "endpointurl", ENDPOINT)
    project.run("dvc", "remote", "modify", "oss", "region", REGION)
    project.run("dvc", "remote", "modify", "oss", "configpath", AWS_CONFIG)


def _commit(project: Project) -> None:
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "pipeline run, OSS remote")


def _clone_elsewhere(project: Project, env: dict) -> Project:
    """A fresh instance: a clone in another directory, with nothing but the repository and the credentials."""
    dest = project.root.parent / "elsewhere" / "instance"
    dest.parent.mkdir()
    project.run("git", "clone", "-q", str(project.root), str(dest))
    return Project(dest, env)


def _remote_objects(oss, prefix: str) -> dict[str, int]:
    """key -> size of every object under `prefix` in the bucket, as moto holds them."""
    pages = oss.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _object_key(prefix: str, path: Path) -> str:
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return f"{prefix}/files/md5/{md5[:2]}/{md5[2:]}"


def test_oss_refuses_botocore_defaults_and_the_committed_config_gets_through(oss, refused, tmp_path):
    """Without the committed config the push is refused, as OSS refuses it (path-style; then, virtual-hosted but
    with botocore's aws-chunked uploads), and ptune says so without a traceback; with it (`configpath`, relative to
    .dvc/) the push goes through and is checked on the remote."""
    repo = Project(tmp_path / "repo", oss.env)
    repo.root.mkdir()
    repo.run("dvc", "init", "-q", "--no-scm")
    shutil.copy2(REPO / AWS_CONFIG, repo.root / AWS_CONFIG)
    (repo.root / ".dvc/virtual-only").write_text("[default]\ns3 =\n    addressing_style = virtual\n")
    (repo.root / "data.bin").write_bytes(os.urandom(3000))
    repo.run("dvc", "add", "data.bin")
    remote = (
        "[core]\n    no_scm = true\n    remote = oss\n"
        f"['remote \"oss\"']\n    url = s3://{BUCKET}/settings\n    endpointurl = {ENDPOINT}\n"
    )

    def push_with(config_line: str):
        # What `dvc remote modify oss configpath .dvc/...` writes from the project's root: a path relative to .dvc/.
        (repo.root / ".dvc/config").write_text(remote + config_line)
        before = len(refused())
        proc = repo.run("ptune", "push", check=False)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc, set(refused()[before:])

    proc, errors = push_with("")
    assert proc.returncode == 2 and errors == {"SecondLevelDomainForbidden"}, proc.stderr
    assert f"dvc push --run-cache failed (DVC remote 'oss': s3://{BUCKET}/settings)" in proc.stderr
    proc, errors = push_with("    configpath = virtual-only\n")
    assert proc.returncode == 2 and errors == {"InvalidArgument"}, proc.stderr
    assert "aws-chunked encoding is not supported" in proc.stderr
    assert "data.bin: not on the remote, 3000 bytes here" in proc.stderr  # named, not counted
    proc, errors = push_with("    configpath = oss-aws-config\n")
    assert proc.returncode == 0 and errors == set(), proc.stderr
    assert "1 object(s) and 0 run-cache entries, each there with its size" in proc.stderr
    assert _remote_objects(oss, "settings") == {_object_key("settings", repo.root / "data.bin"): 3000}
    assert oss.stand_in.tunnels_refused == []  # nothing asked for any other host


def test_push_checks_the_remote_and_a_fresh_clone_restores_through_oss_recomputing_nothing(ran_project, oss, refused):
    """`ptune push` after a run, through OSS, where the remote first loses an upload (DVC #10643: the client hears
    success, nothing is stored) and then has an object cut short: DVC counts both as pushed, ptune lists the remote,
    fails naming what is missing, then sends both again. A fresh clone elsewhere restores everything, the resume
    state of a stopped training included, and recomputes nothing."""
    a = Project(ran_project.root, oss.env)
    _use_oss(a, "round-trip")
    _commit(a)
    ckpt = a.root / ".ptune/state/train/0123456789abcdef/checkpoint-00000004.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(os.urandom(4096))
    prefix_key = _object_key("round-trip", a.root / PREFIX)
    oss.stand_in.lose_uploads_of.add(f"/{prefix_key}")

    proc = a.run("ptune", "push", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"train: {PREFIX}" in proc.stderr and "not on the remote" in proc.stderr and "Traceback" not in proc.stderr
    assert "ptune sent these again from this instance and the remote still lacks them" in proc.stderr
    assert len(oss.stand_in.lost) >= 2  # DVC's upload and ptune's second one, both answered 200 and dropped

    # The remote keeps what it is sent now, and one more object is cut short there by hand. DVC takes the
    # directory's listing on the remote for the whole directory and never compares sizes: it sends neither.
    oss.stand_in.lose_uploads_of.clear()
    base = sorted(p for p in (a.root / "models/base").rglob("*") if p.is_file() and p.stat().st_size > 100)[0]
    base_key = _object_key("round-trip", base)
    oss.s3.put_object(Bucket=BUCKET, Key=base_key, Body=base.read_bytes()[:100])
    first = len(oss.stand_in.requests)
    proc = a.run("ptune", "push")
    assert f"train: {PREFIX}" in proc.stderr and "each of them is there now" in proc.stderr, proc.stderr[-3000:]
    size = base.stat().st_size
    assert f"fetch_weights: {base.relative_to(a.root)}: 100 bytes on the remote, {size} bytes here" in proc.stderr
    sent = [r[2] for r in oss.stand_in.requests[first:] if r[0] == "PUT" and "/files/md5/" in r[2]]
    assert sorted(sent) == sorted(f"/{key}" for key in (prefix_key, base_key))  # ptune's, once each
    status = json.loads(a.run("ptune", "status", "--json").stdout)
    assert status["remote"]["url"] == f"s3://{BUCKET}/round-trip" and status["remote"]["warning"] is None
    assert {row["remote"] for row in status["stages"].values()} == {"on remote"}

    b = _clone_elsewhere(a, oss.env)
    b.run("ptune", "restore")
    assert "up to date" in b.run("dvc", "status").stdout
    b.run("dvc", "repro")
    assert b.executed() == []
    for path in (a.root / PREFIX, base, ckpt):
        assert (b.root / path.relative_to(a.root)).read_bytes() == path.read_bytes()
    assert refused() == [] and oss.stand_in.tunnels_refused == []
    hosts = {host for _, host, _, _ in oss.stand_in.requests}
    assert hosts <= {f"{BUCKET}.{ENDPOINT_HOST}", ENDPOINT_HOST}


@pytest.mark.slow
def test_an_object_over_100_mib_goes_in_parts_and_comes_back_byte_for_byte(ran_project, oss, refused):
    a = Project(ran_project.root, oss.env)
    _use_oss(a, "large")
    big = a.root / "data/extra/large.bin"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as fh:
        for _ in range(105):  # 105 MiB: s3fs uploads in 50 MiB parts from 100 MiB on
            fh.write(os.urandom(1 << 20))
    a.run("dvc", "add", str(big.relative_to(a.root)))
    _commit(a)
    first = len(oss.stand_in.requests)
    a.run("ptune", "push")
    parts = [r for r in oss.stand_in.requests[first:] if r[0] == "PUT" and "partNumber=" in r[2]]
    assert len(parts) >= 3, oss.stand_in.requests[first:]
    assert _remote_objects(oss, "large")[_object_key("large", big)] == big.stat().st_size

    b = _clone_elsewhere(a, oss.env)
    b.run("ptune", "restore")
    copy = b.root / big.relative_to(a.root)
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
    assert refused() == []


@pytest.mark.slow
def test_a_training_stopped_here_resumes_on_a_fresh_instance_through_oss(ran_project, oss, refused):
    """SIGTERM to `ptune train` with pushing on: its resume state goes to OSS, a fresh clone (`ptune restore`,
    `dvc repro`) resumes from that step and ends with the uninterrupted run's prefix."""
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    a = Project(ran_project.root, oss.env)
    for key, value in (("max_steps", 120), ("save_steps", 10_000), ("logging_steps", 1)):
        a.set_param(f"train.{key}", value)
    _use_oss(a, "resume")
    _commit(a)
    a.run("ptune", "push")  # the base model and data, for the new instance
    a.run("ptune", "train")
    uninterrupted = load_file(str(a.root / PREFIX))

    log = a.root / "reports/train_log.csv"
    log.unlink()
    proc = subprocess.Popen(
        ["ptune", "train"],
        cwd=a.root,
        env={**a.env, "PTUNE_CHECKPOINT_PUSH_EVERY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and len(log.read_text(encoding="utf-8").splitlines()) > 10:  # header + 10 steps
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    manifest = oss.s3.get_object(Bucket=BUCKET, Key="resume/ptune-state/train/manifest.json")["Body"].read()
    (step,) = {int(n.split("-")[1].split(".")[0]) for n in json.loads(manifest)["files"] if n.startswith("checkpoint-")}
    assert 10 <= step < 120 and "pushed" in err, err[-3000:]

    b = _clone_elsewhere(a, oss.env)
    b.run("ptune", "restore")  # stage outputs, run-cache and the stopped run's resume state
    out = b.run("dvc", "repro", "train")
    assert "resuming from" in out.stdout + out.stderr
    assert json.loads((b.root / "reports/timings/train.json").read_text())["resumed_from_step"] == step
    resumed = load_file(str(b.root / PREFIX))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.allclose(resumed[name], uninterrupted[name]), name
    assert refused() == []
