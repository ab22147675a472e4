"""Surviving the instance: push, fresh clones that recompute nothing, S3 on loopback, partial loss, status.

Every test works on a copy of the session's finished pipeline (`ran_project`, in tmp_path/project), whose default
DVC remote is the directory beside it (tmp_path/ptune-dvc-storage); "a fresh instance" is a git clone beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import STAGES, Project
from support.oss_stand_in import moto_s3

PREFIX = "models/ptuning/prefix.safetensors"


def _commit(project: Project) -> None:
    """What a user commits after a run: dvc.lock, params and the .gitignore files DVC wrote."""
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "pipeline run")


def _clone(project: Project, name: str, env: dict | None = None) -> Project:
    """A fresh instance: a clone beside the first one (so it shares the default remote ../ptune-dvc-storage)."""
    dest = project.root.parent / name
    project.run("git", "clone", "-q", str(project.root), str(dest))
    return Project(dest, env or project.env)


def _status(project: Project) -> dict:
    return json.loads(project.run("ptune", "status", "--json").stdout)


def test_fresh_instances_restore_every_stage_without_recomputing(ran_project):
    a = ran_project
    _commit(a)
    a.run("dvc", "push", "--run-cache")
    # A configuration computed and pushed here but not committed: only the run-cache remembers it.
    a.set_param("report.n_samples", 1)  # the tiny params show 2
    a.run("dvc", "repro")
    assert a.executed() == ["report"]
    one_sample = (a.root / "reports/report.md").read_bytes()
    a.run("dvc", "push", "--run-cache")

    b = _clone(a, "instance-b")
    b.run("dvc", "pull")
    b.run("dvc", "repro")
    assert b.executed() == []
    assert "up to date" in b.run("dvc", "status").stdout

    c = _clone(a, "instance-c")
    c.run("dvc", "repro", "--pull")  # no `dvc pull` first
    assert c.executed() == []
    assert (c.root / PREFIX).is_file()
    # The run-cache: the other configuration is restored, not recomputed.
    c.run("dvc", "pull", "--run-cache")
    c.set_param("report.n_samples", 1)
    c.run("dvc", "repro", "--pull")
    assert c.executed() == []
    assert (c.root / "reports/report.md").read_bytes() == one_sample


def _object(remote_or_cache, md5: str):
    return remote_or_cache / "files" / "md5" / md5[:2] / md5[2:]


def test_lost_output_is_restored_and_a_remote_without_it_names_stage_and_file(ran_project):
    import hashlib

    a = ran_project
    _commit(a)
    a.run("ptune", "push")
    shutil.rmtree(a.root / "models/ptuning")
    rows = _status(a)["stages"]
    assert rows["train"] == {"workspace": "missing locally", "remote": "on remote", "libraries": []}
    assert rows["evaluate"]["workspace"] == "up to date"
    a.run("dvc", "checkout")  # from the local cache
    assert (a.root / PREFIX).is_file()

    # The instance lost it, local cache included: the remote has it.
    md5 = hashlib.md5((a.root / PREFIX).read_bytes()).hexdigest()
    shutil.rmtree(a.root / "models/ptuning")
    shutil.rmtree(a.root / ".dvc/cache")
    a.run("ptune", "restore")
    assert hashlib.md5((a.root / PREFIX).read_bytes()).hexdigest() == md5
    assert a.executed() == []

    # The remote lost it too: the error names the stage, the file and what to run, not a hash.
    _object(a.root.parent / "ptune-dvc-storage", md5).unlink()
    _object(a.root / ".dvc/cache", md5).unlink()
    shutil.rmtree(a.root / "models/ptuning")
    proc = a.run("ptune", "restore", check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"train: {PREFIX}" in proc.stderr and "Traceback" not in proc.stderr
    assert "ptune push" in proc.stderr and "snakemake --cores 1 report" in proc.stderr
    a.run("dvc", "repro")  # what the message says: recompute it
    assert a.executed() == ["train", "report"]  # the same prefix: evaluate and deploy stand (report: timings)
    assert hashlib.md5((a.root / PREFIX).read_bytes()).hexdigest() == md5


def test_status_per_stage_and_a_loud_warning_while_the_remote_shares_the_disk(ran_project):
    a = ran_project
    a.set_param("evaluate.max_new_tokens", 6)
    proc = a.run("ptune", "status")
    table = {line.split()[0]: line for line in proc.stdout.splitlines()[3 : 3 + len(STAGES)]}
    assert set(table) == set(STAGES)
    assert "up to date" in table["train"] and "not on remote" in table["train"]
    assert "changed (will recompute)" in table["evaluate"]
    assert str(a.root.parent / "ptune-dvc-storage") in proc.stdout
    assert "is on the same disk as this workspace" in proc.stderr and "!!!!!!!!" in proc.stderr


def test_push_each_stage_is_off_by_default_and_pushes_as_each_stage_ends(ran_project):
    a = ran_project
    remote = a.root.parent / "ptune-dvc-storage"
    assert not remote.exists()  # the session's pipeline ran without the switch: nothing was pushed
    # Forced, so that the rules run (DVC restores each stage) without the cost of recomputing.
    proc = subprocess.run(
        ["snakemake", "--cores", "1", "--forceall", "preprocess"],
        cwd=a.root,
        text=True,
        env={**a.env, "PTUNE_PUSH_EACH_STAGE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert a.executed() == []
    # Each rule pushed inside its own job, before Snakemake marked it finished: a stop later in the run keeps it.
    jobs = proc.stdout.split("Finished jobid")[:-1]
    assert len(jobs) == 3 and all("each there with its size" in job for job in jobs), proc.stdout[-4000:]
    assert "is on the same disk" not in "".join(jobs)  # said once, at the end, not by every job's push
    remote_state = {name: row["remote"] for name, row in _status(a)["stages"].items()}
    assert remote_state == {
        **{s: "not on remote" for s in STAGES},
        **{s: "on remote" for s in ("fetch_weights", "fetch_data", "preprocess")},
    }
    # The end of the run says the remote would not survive the instance.
    assert "is on the same disk as this workspace" in proc.stdout.split("Finished jobid")[-1]


def test_checkpoint_push_keeps_the_latest_and_pull_refuses_a_damaged_file(ran_project, tmp_path):
    a = ran_project
    state = a.root / ".ptune/state/train/0123456789abcdef"
    state.mkdir(parents=True)
    for step in (4, 8):
        (state / f"checkpoint-{step:08d}.pt").write_bytes(os.urandom(1000 + step))
    a.run("ptune", "checkpoint", "push")
    (state / "checkpoint-00000004.pt").unlink()  # what save_total_limit does as training goes on
    (state / "checkpoint-00000012.pt").write_bytes(os.urandom(2000))
    (state / ".checkpoint-00000016.pt.tmp-x").write_bytes(b"being written")
    a.run("ptune", "checkpoint", "push")
    remote = a.root.parent / "ptune-dvc-storage" / "ptune-state" / "train"
    assert sorted(p.name for p in (remote / state.name).iterdir()) == [
        "checkpoint-00000008.pt",
        "checkpoint-00000012.pt",
    ]
    shutil.rmtree(a.root / ".ptune/state")
    a.run("ptune", "checkpoint", "pull")
    assert sorted(p.name for p in state.iterdir()) == ["checkpoint-00000008.pt", "checkpoint-00000012.pt"]

    shutil.rmtree(a.root / ".ptune/state")
    (remote / state.name / "checkpoint-00000012.pt").write_bytes(b"truncated")
    proc = a.run("ptune", "checkpoint", "pull", check=False)
    assert proc.returncode == 2 and "checkpoint-00000012.pt: md5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (state / "checkpoint-00000012.pt").exists()  # never taken for a checkpoint


@pytest.mark.slow
def test_fresh_instance_resumes_training_from_pushed_checkpoints(ran_project):
    import signal

    import torch
    from safetensors.torch import load_file

    a = ran_project
    for key, value in (("max_steps", 24), ("save_steps", 4), ("prefix_dropout", 0.1)):
        a.set_param(f"train.{key}", value)  # dropout: resuming must restore the RNG too
    _commit(a)
    a.run("dvc", "push")  # the base model and data, for the new instance
    a.run("ptune", "train")
    uninterrupted = load_file(str(a.root / PREFIX))

    # A run that pushes every checkpoint as it is written, stopped without warning once the remote has step 8.
    manifest = a.root.parent / "ptune-dvc-storage" / "ptune-state" / "train" / "manifest.json"
    proc = subprocess.Popen(
        ["ptune", "train"],
        cwd=a.root,
        env={**a.env, "PTUNE_CHECKPOINT_PUSH_EVERY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300

    def pushed_step() -> int:
        files = json.loads(manifest.read_text())["files"] if manifest.is_file() else {}
        return max((int(name.split("-")[1].split(".")[0]) for name in files), default=0)

    while proc.poll() is None and time.monotonic() < deadline:
        if pushed_step() >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    step = pushed_step()

    b = _clone(a, "instance-b")
    b.run("ptune", "restore")  # stage outputs, run-cache and the resume state
    out = b.run("dvc", "repro", "train")
    assert "resuming from" in out.stdout + out.stderr
    assert b.executed() == ["train"]
    assert json.loads((b.root / "reports/timings/train.json").read_text())["resumed_from_step"] == step
    resumed = load_file(str(b.root / PREFIX))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.allclose(resumed[name], uninterrupted[name]), name


@pytest.mark.slow
def test_a_stopped_run_pushes_its_step_and_a_fresh_instance_resumes_there(ran_project):
    """SIGTERM (a notebook being stopped) to `ptune train` with pushing on and no periodic checkpoint yet: the stage
    saves the step it is on, pushes it before it exits, and a fresh clone (`ptune restore`, `dvc repro`) resumes
    from exactly that step, no step lost, and ends with the uninterrupted run's prefix."""
    import signal

    import torch
    from safetensors.torch import load_file

    a = ran_project
    for key, value in (("max_steps", 120), ("save_steps", 10_000), ("logging_steps", 1)):
        a.set_param(f"train.{key}", value)
    _commit(a)
    a.run("dvc", "push")  # the base model and data, for the new instance
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
    manifest = a.root.parent / "ptune-dvc-storage" / "ptune-state" / "train" / "manifest.json"
    names = json.loads(manifest.read_text())["files"]
    (step,) = {int(n.split("-")[1].split(".")[0]) for n in names if n.startswith("checkpoint-")}
    assert 10 <= step < 120 and "pushed" in err, err[-3000:]

    b = _clone(a, "instance-b")
    b.run("ptune", "restore")  # stage outputs, run-cache and the stopped run's resume state
    out = b.run("dvc", "repro", "train")
    assert "resuming from" in out.stdout + out.stderr
    assert json.loads((b.root / "reports/timings/train.json").read_text())["resumed_from_step"] == step
    resumed = load_file(str(b.root / PREFIX))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.allclose(resumed[name], uninterrupted[name]), name


@pytest.fixture
def s3_server(env):
    """moto's S3 server on loopback, and the environment that points DVC and boto at it."""
    s3_env = {
        **env,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with moto_s3(env) as url:
        yield url, s3_env


def test_s3_remote_round_trip_on_loopback(ran_project, s3_server):
    import boto3

    url, s3_env = s3_server
    boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    ).create_bucket(Bucket="ptune-bucket")
    a = Project(ran_project.root, s3_env)
    a.run("dvc", "remote", "add", "-d", "-f", "store", "s3://ptune-bucket/ptune")
    a.run("dvc", "remote", "modify", "store", "endpointurl", url)
    _commit(a)
    # The resume state of a training stopped mid-run travels too.
    ckpt = a.root / ".ptune/state/train/0123456789abcdef/checkpoint-00000004.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(os.urandom(4096))
    a.run("ptune", "push")
    status = _status(a)
    assert status["remote"]["name"] == "store" and status["remote"]["url"] == "s3://ptune-bucket/ptune"
    assert status["remote"]["warning"] is None and not status["remote"]["same_disk"]
    assert {row["remote"] for row in status["stages"].values()} == {"on remote"}
    assert status["resume_state"]["train"] == {
        "local": ckpt.name,
        "remote": ckpt.name,
        "running": None,
        "stopped": None,
    }

    # A fresh instance somewhere else: nothing but the clone and the credentials.
    elsewhere = a.root.parent / "elsewhere"
    elsewhere.mkdir()
    b = _clone(a, "elsewhere/instance")
    proc = b.run("ptune", "restore")
    assert "same disk" not in proc.stderr
    assert "up to date" in b.run("dvc", "status").stdout
    assert (b.root / ckpt.relative_to(a.root)).read_bytes() == ckpt.read_bytes()
    assert not (b.root.parent / "ptune-dvc-storage").exists()
