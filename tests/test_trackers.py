"""What the live-metrics trackers (reporting/live.py) leave where others read it.

reports/live/<stage>/ is a stage output: DVC caches it and `dvc push` sends it to the remote. W&B's run folder there
must hold the metrics alone: no host name, command line, git remote (which may carry a token) or console output. A
tracker that cannot start is logged, and the log must not carry the credentials of the server's URL
(`https://user:token@host`, as MLFLOW_TRACKING_URI may be). Real wandb (offline) and mlflow where installed; neither is
in the test extra, so those two tests are skipped without them.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ptune.reporting import live


def test_a_tracker_error_is_logged_with_url_credentials_masked():
    """The masking the log applies to every tracker's error, whatever the URL's form."""
    cases = {
        "API request to https://alice:s3cr3t@mlflow.example/api/2.0 failed": "https://***@mlflow.example/api/2.0",
        "http://hf_tokenOnly@127.0.0.1:5000/x": "http://***@127.0.0.1:5000/x",
        "to https://bob:p@ss@host:443/ (refused)": "https://***@host:443/ (refused)",
        "no URL here, an @ sign: user@host": "no URL here, an @ sign: user@host",
    }
    for error, logged in cases.items():
        assert logged in live._masked(RuntimeError(error))
    assert "s3cr3t" not in live._masked(RuntimeError("see http://alice:s3cr3t@a/ and https://alice:s3cr3t@b/"))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_mlflow_server_out_of_reach_is_logged_without_its_credentials(tmp_path, monkeypatch, caplog, capfd):
    """MLFLOW_TRACKING_URI with a user and password, its server down: the stage goes on without MLflow, and neither
    ptune's warning nor anything MLflow prints holds the password (MLflow's error quotes the whole URL)."""
    pytest.importorskip("mlflow")
    password = "ptune-planted-" + os.urandom(6).hex()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{password}@127.0.0.1:{_closed_port()}/")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not after minutes of backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with caplog.at_level(logging.WARNING, logger="ptune.reporting.live"):
        tracker = live.Live(Path("reports/live/train"), [(1, {"loss": 9.0})], names=("mlflow",))
    assert tracker.trackers == {}
    out, err = capfd.readouterr()
    assert "mlflow could not start" in caplog.text and "http://***@127.0.0.1:" in caplog.text, caplog.text
    assert password not in caplog.text + out + err


def test_wandb_keeps_host_command_line_git_and_console_out_of_reports_live(tmp_path, monkeypatch, env):
    """An offline W&B run in a git checkout whose remote URL carries a token, under a command line and a host name
    planted for the test, printing to the console: reports/live/train/wandb/ has the run's metrics and none of
    these."""
    wandb = pytest.importorskip("wandb")
    planted = "ptune-planted-" + os.urandom(6).hex()
    monkeypatch.chdir(tmp_path)
    remote = f"https://someone:{planted}-token@git.example/{planted}-remote.git"
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"], ["remote", "add", "origin", remote]):
        subprocess.run(["git", *args], env=env, check=True)  # the tests' own git config, never the machine's
    commit = subprocess.run(["git", "rev-parse", "HEAD"], env=env, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(sys, "argv", ["ptune", "train", f"--{planted}-arg"])
    monkeypatch.setenv("WANDB_HOST", f"{planted}-host")
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):  # not ~/.cache
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    folder = Path("reports/live/train")
    # W&B's service lives on in the process that started it and resolves a relative run folder against its own
    # working directory: one an earlier test left is stopped, and so is this test's, for the next.
    wandb.teardown()
    tracker = live.Live(folder, [(1, {"loss": 9.0})], names=("wandb",))
    assert set(tracker.trackers) == {"wandb"}
    print(f"{planted}-console")
    tracker.log(2, {"loss": 8.0})
    tracker.close()
    wandb.teardown()
    (run_file,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0 and wandb.run is None
    files = [p for p in folder.rglob("*") if p.is_file()]
    leaked = sorted({str(p) for p in files for s in (planted, commit) if s.encode() in p.read_bytes()})
    assert leaked == [], leaked
