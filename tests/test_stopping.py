"""Stopping on request (ptune.state.stopping) and live metrics (ptune.reporting.live), with real processes and signals.

Every signal is sent on progress, never after a sleep: once reports/train_log.csv (rewritten at each row) holds
enough rows, once the evaluation journal holds enough batches, once the fault trace shows the stage at work.
The default suite runs one case, the hardest front end: SIGTERM to `dvc repro` alone, which dies of it without
passing it on. The rest is slow-marked (`make test-all`).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ptune.errors import PtuneError
from ptune.reporting import live
from ptune.state.faults import TRACE_ENV
from ptune.state.stopping import running_stages

from conftest import Project
from support.processes import alive

PREFIX = "models/ptuning/prefix.safetensors"
TRAIN_LOG = "reports/train_log.csv"
LIVE_LOSS = "reports/live/train/plots/metrics/loss.tsv"
DEADLINE_S = 300


def _long_training(project, steps: int = 200) -> None:
    """Long enough to be stopped midway; a row every step, and no periodic checkpoint before the stop: the one
    the stop writes is what the rerun resumes from."""
    project.set_param("train.max_steps", steps)
    project.set_param("train.logging_steps", 1)
    project.set_param("train.save_steps", 10_000)


def _rows(project) -> list[dict]:
    path = project.root / TRAIN_LOG
    return list(csv.DictReader(path.open(encoding="utf-8"))) if path.is_file() else []


def _tsv_steps(path: Path) -> list[int]:
    return [int(row["step"]) for row in csv.DictReader(path.open(encoding="utf-8"), delimiter="\t")]


def _wait_for(what: str, condition, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert proc.poll() is None, f"{what}: the run ended first (exit {proc.returncode})"
        assert time.monotonic() < deadline, f"{what}: not reached in {DEADLINE_S} s"
        time.sleep(0.02)


def _stop_when(project, cmd: list[str], ready, sig: int, *, to_stage: bool = False, env=None):
    """Start `cmd`, send `sig` once `ready()` (to the front end, or to the ptune stage process itself), and wait
    for both. Returns (front end's completed process, seconds from the signal until the stage process was gone)."""
    proc = subprocess.Popen(
        cmd, cwd=project.root, env=env or project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for("progress", ready, proc)
        stages = running_stages(project.root / ".ptune/locks")
        assert len(stages) == 1, stages
        pid = next(iter(stages.values()))
        sent = time.monotonic()
        os.kill(pid, sig) if to_stage else proc.send_signal(sig)
        deadline = sent + 120
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        took = time.monotonic() - sent
        assert not alive(pid), f"the stage (pid {pid}) did not stop in 120 s"
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, ""), took


def _stop_record(project, stage: str, output: str = "") -> dict:
    records = list((project.root / ".ptune/state" / stage).glob("*/stopped.json"))
    assert len(records) == 1, f"stop records: {records}; the run printed:\n{output[-6000:]}"
    return json.loads(records[0].read_text(encoding="utf-8"))


def _shell_that_does_not_exec(folder: Path) -> str:
    """The environment for `dvc repro` with a $SHELL that stays between dvc and the stage command instead of
    exec'ing it, as fish does (bash and dash exec a lone command): when dvc dies the stage's parent lives on."""
    shell = folder / "no-exec-shell"
    shell.write_text('#!/bin/sh\n# $1 is -c, $2 the command (dvc/stage/run.py)\n/bin/sh -c "$2"\nexit $?\n')
    shell.chmod(0o755)
    return str(shell)


def test_sigterm_to_dvc_repro_stops_training_after_a_step_and_the_rerun_resumes_there(ran_project, tmp_path):
    p = ran_project
    _long_training(p)
    env = {**p.env, "SHELL": _shell_that_does_not_exec(tmp_path)}
    killed, took = _stop_when(p, ["dvc", "repro", "train"], lambda: len(_rows(p)) >= 5, signal.SIGTERM, env=env)
    # dvc dies of SIGTERM without passing it on; its stage sees it gone (though its shell lives on), saves its
    # step and stops.
    assert killed.returncode == -signal.SIGTERM, killed.stdout[-3000:]
    record = _stop_record(p, "train", killed.stdout)
    step = record["step"]
    assert record["signal"] == "SIGTERM" and "dvc" in record["reason"] and 5 <= step < 200
    assert (p.root / ".ptune/state/train").glob(f"*/checkpoint-{step:08d}.safetensors")
    # The live log holds whole rows, every step up to the stop once; no temp file is left.
    assert [int(r["step"]) for r in _rows(p)] == list(range(1, step + 1))
    assert _tsv_steps(p.root / LIVE_LOSS) == list(range(1, step + 1))
    assert not list(p.root.glob("reports/**/.*.tmp-*")) and not list(p.root.glob("models/**/.*.tmp-*"))
    print(f"SIGTERM to dvc -> train gone in {took:.2f} s, stopped after step {step} (checkpoint at that step)")

    status = json.loads(p.run("ptune", "status", "--json").stdout)["resume_state"]["train"]
    assert status["stopped"]["step"] == step and status["running"] is None
    assert "stopped by SIGTERM" in p.run("ptune", "status").stdout

    p.clear_log()
    out = p.run("dvc", "repro", "train")
    assert f"step {step} of 200" in out.stdout + out.stderr and "resuming from" in out.stdout + out.stderr
    assert p.executed() == ["train"]
    # The curve goes on from the checkpoint's step: every step once, in the declared plot and the live one.
    assert [int(r["step"]) for r in _rows(p)] == list(range(1, 201))
    assert _tsv_steps(p.root / LIVE_LOSS) == list(range(1, 201))
    assert json.loads((p.root / "reports/live/train/metrics.json").read_text())["step"] == 200
    assert not list((p.root / ".ptune/state/train").glob("*/*"))  # resume state and stop record removed
    assert "train" not in json.loads(p.run("dvc", "status", "--json").stdout or "{}")


def test_trackers_rebuild_their_history_and_never_log_a_step_twice(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # no DVC repository around: DVCLive logs, nothing else
    folder = Path("reports/live/train")

    def run(history, new_steps):
        tracker = live.Live(folder, history, names=("dvclive", "tensorboard"))
        for step in new_steps:
            tracker.log(step, {"loss": 10.0 - step, "learning_rate": 0.1})
        tracker.close()

    run([], [1, 2, 3, 4])
    # A resume from a checkpoint at step 2: what came after it is dropped with it, then the run goes on.
    run([(1, {"loss": 9.0, "learning_rate": 0.1}), (2, {"loss": 8.0, "learning_rate": 0.1})], [3, 4, 5])
    assert _tsv_steps(folder / "plots/metrics/loss.tsv") == [1, 2, 3, 4, 5]
    assert json.loads((folder / "metrics.json").read_text())["step"] == 5
    (events,) = (folder / live.TENSORBOARD_DIR).iterdir()
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5]
    assert [e.value for e in acc.Scalars("loss")] == [9.0, 8.0, 7.0, 6.0, 5.0]

    assert live.chosen("") == ("dvclive",) and live.chosen("none") == ()
    assert live.chosen("TensorBoard, dvclive") == ("tensorboard", "dvclive")
    with pytest.raises(PtuneError, match="unknown tracker 'neptune'.*dvclive, tensorboard, mlflow, wandb"):
        live.chosen("dvclive,neptune")
    live.Live(folder, [], names=())  # no tracker: the declared output is still there, empty
    assert folder.is_dir() and not any(folder.iterdir())


@pytest.mark.slow
def test_stopped_training_resumes_to_the_bytes_of_an_uninterrupted_run_through_every_front_end(ran_project):
    """SIGTERM and SIGHUP to Snakemake alone (it passes them on), SIGINT (Ctrl-C) to the stage; TensorBoard too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _long_training(ran_project)
    env = {**ran_project.env, live.ENV: "dvclive,tensorboard"}
    p = Project(ran_project.root, env)
    lock = (p.root / "dvc.lock").read_text()  # train with the tiny params' 6 steps: DVC sees the 200 as a change
    p.run("ptune", "train")
    uninterrupted = (p.root / PREFIX).read_bytes()
    reference = [(r["step"], r["loss"], r["learning_rate"]) for r in _rows(p)]

    cases = [
        (["snakemake", "--cores", "1", "train"], signal.SIGTERM, False),
        (["snakemake", "--cores", "1", "train"], signal.SIGHUP, False),
        (["ptune", "train"], signal.SIGINT, True),
    ]
    for cmd, sig, to_stage in cases:
        what = f"{signal.Signals(sig).name} to {cmd[0]}"
        # Train must run again, with the same params: no output, no dvc.lock entry and no run-cache entry to restore
        # it from.
        for path in (p.root / ".dvc/cache/runs", p.root / "models/ptuning"):
            shutil.rmtree(path, ignore_errors=True)
        (p.root / "dvc.lock").write_text(lock)
        (p.root / TRAIN_LOG).unlink(missing_ok=True)
        stopped, took = _stop_when(p, cmd, lambda: len(_rows(p)) >= 5, sig, to_stage=to_stage)
        assert stopped.returncode != 0, f"{what}: finished\n{stopped.stdout[-3000:]}"
        assert f"stopped ({signal.Signals(sig).name} received) after step" in stopped.stdout, stopped.stdout[-3000:]
        assert "Traceback" not in stopped.stdout
        if cmd[0] == "ptune":
            assert stopped.returncode == 128 + sig
        step = _stop_record(p, "train")["step"]
        print(f"{what}: the stage was gone {took:.2f} s after the signal, stopped after step {step}")

        shutil.rmtree(p.root / ".dvc/cache/runs", ignore_errors=True)
        out = p.run("dvc", "repro", "train", timeout=600)
        assert f"step {step} of 200" in out.stdout + out.stderr, what
        assert (p.root / PREFIX).read_bytes() == uninterrupted, what
        assert [(r["step"], r["loss"], r["learning_rate"]) for r in _rows(p)] == reference, what
        assert _tsv_steps(p.root / LIVE_LOSS) == list(range(1, 201)), what
        acc = EventAccumulator(str(p.root / "reports/live/train" / live.TENSORBOARD_DIR))
        acc.Reload()
        assert [e.step for e in acc.Scalars("loss")] == list(range(1, 201)), what


@pytest.mark.slow
def test_stopped_evaluation_keeps_its_batches_and_resumes_to_identical_outputs(ran_project):
    p = ran_project
    p.set_param("evaluate.batch_size", 1)
    p.set_param("evaluate.max_new_tokens", 32)
    p.set_param("evaluate.max_examples", 16)
    outputs = ("reports/predictions.jsonl", "reports/metrics.json")
    p.run("ptune", "evaluate")
    uninterrupted = {rel: (p.root / rel).read_bytes() for rel in outputs}
    n = json.loads(uninterrupted["reports/metrics.json"])["n_examples"]  # one batch each (the dev set may be smaller)
    for rel in outputs:
        (p.root / rel).unlink()

    state = p.root / ".ptune/state/evaluate"

    def batches() -> int:
        return sum(len(f.read_text().splitlines()) for f in state.glob("*/*.jsonl")) if state.is_dir() else 0

    stopped, took = _stop_when(p, ["ptune", "evaluate"], lambda: batches() >= 3, signal.SIGTERM, to_stage=True)
    assert stopped.returncode == 128 + signal.SIGTERM and "Traceback" not in stopped.stdout, stopped.stdout[-3000:]
    record = _stop_record(p, "evaluate")
    kept = record["batches_done"]
    assert sum(kept.values()) == batches() >= 3 and record["batches"] == n
    assert f"base {kept['base']} of {n}" in stopped.stdout
    assert not any((p.root / rel).exists() for rel in outputs)
    assert "evaluate" in p.run("ptune", "status").stdout.split("resume state of")[-1]
    print(f"SIGTERM to evaluate: gone in {took:.2f} s with {kept} of {n} batches kept")

    resumed = p.run("ptune", "evaluate")
    assert "resuming" in resumed.stderr
    assert {rel: (p.root / rel).read_bytes() for rel in outputs} == uninterrupted
    steps = _tsv_steps(p.root / "reports/live/evaluate/plots/metrics/examples.tsv")
    assert steps == sorted(set(steps)) and steps[-1] == 2 * n  # n batches of each model, each step once


@pytest.mark.slow
def test_a_stage_without_progress_to_save_stops_at_once_and_leaves_nothing(ran_project):
    p = ran_project
    params = p.root / "params.yaml"
    text = params.read_text(encoding="utf-8")
    assert "    pretrain_steps: 5\n" in text
    params.write_text(text.replace("    pretrain_steps: 5\n", "    pretrain_steps: 100000\n"), encoding="utf-8")
    trace = p.root.parent / "trace.tsv"

    def pretraining() -> bool:
        return trace.is_file() and trace.read_text().count("fetch_weights\tpretrain_step") >= 3

    env = {**p.env, TRACE_ENV: str(trace)}
    stopped, took = _stop_when(p, ["ptune", "fetch_weights"], pretraining, signal.SIGTERM, to_stage=True, env=env)
    assert stopped.returncode == 128 + signal.SIGTERM and "Traceback" not in stopped.stdout, stopped.stdout[-3000:]
    assert "fetch_weights: stopped (SIGTERM received)" in stopped.stdout
    assert not list(p.root.glob("models/.*.tmp-*")) and not list(p.root.glob("models/**/.*.tmp-*"))
    assert running_stages(p.root / ".ptune/locks") == {}
    print(f"SIGTERM to fetch_weights: gone in {took:.2f} s")


def test_mlflow_and_wandb_get_the_same_series_as_dvclive(tmp_path, monkeypatch):
    """The same rows, resumed history included, through MLflow's client (a local file store) and W&B (offline).
    Neither package is in the test extra: where they are not installed (CI), this test is skipped."""
    pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for tests like this
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):  # not ~/.cache
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    folder = Path("reports/live/train")
    tracker = live.Live(folder, [(1, {"loss": 9.0})], names=("mlflow", "wandb"))
    for step in (2, 3):
        tracker.log(step, {"loss": 10.0 - step})
    assert set(tracker.trackers) == {"mlflow", "wandb"}
    run_id = tracker.trackers["mlflow"].run_id
    tracker.close()
    history = MlflowClient(tracking_uri=store).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    (run_file,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0 and wandb.run is None  # written, and the run finished

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(PtuneError, match="MLFLOW_TRACKING_URI is not set"):
        live.Live(folder, [], names=("mlflow",))
