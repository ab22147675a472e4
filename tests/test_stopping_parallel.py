"""Stopping a training of several processes (`train.devices: 2`, gloo on the CPU) with real signals.

Every signal is sent on progress (reports/train_log.csv holding enough rows), never after a sleep. A signal to the
`ptune train` launcher (what DVC, Snakemake, Slurm or a terminal signals) and one to a single worker (what a user or
an OOM killer may hit) must both stop every process after the same step, with rank 0's checkpoint at it, leave no
process behind, and resume to what an uninterrupted run of two processes makes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from support.processes import alive

PREFIX = "models/ptuning/prefix.safetensors"
TRAIN_LOG = "reports/train_log.csv"
STEPS = 40
DEADLINE_S = 300


def _rows(project) -> list[dict]:
    path = project.root / TRAIN_LOG
    return list(csv.DictReader(path.open(encoding="utf-8"))) if path.is_file() else []


def _stop_when(project, ready, sig: int, to_rank: int | None, log_path):
    """Start `ptune train`, send `sig` once `ready()` to the launcher (`to_rank` None) or to that worker alone,
    and wait until the launcher and every worker are gone. Returns (exit status, output, seconds until all gone)."""
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(["ptune", "train"], cwd=project.root, env=project.env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not ready():
            assert proc.poll() is None, f"the run ended first (exit {proc.returncode}): {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no progress in {DEADLINE_S} s"
            time.sleep(0.02)
        launcher = psutil.Process(proc.pid)
        children = launcher.children(recursive=True)
        workers = {int(c.environ()["RANK"]): c.pid for c in children if "ptune.stages.worker" in c.cmdline()}
        assert sorted(workers) == [0, 1], [c.cmdline() for c in children]
        pids = [proc.pid, *workers.values()]
        sent = time.monotonic()
        os.kill(proc.pid if to_rank is None else workers[to_rank], sig)
        while any(map(alive, pids)) and time.monotonic() < sent + 120:
            time.sleep(0.01)
        took = time.monotonic() - sent
        assert not any(map(alive, pids)), f"still running 120 s after the signal: {[p for p in pids if alive(p)]}"
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, log_path.read_text(encoding="utf-8"), took


def _check_stop(project, code: int, out: str, sig: int) -> int:
    """The launcher's exit status and last line, both ranks' exits and step, rank 0's checkpoint and record."""
    name = signal.Signals(sig).name
    assert code == 128 + sig and "Traceback" not in out, out[-4000:]
    last = out.strip().splitlines()[-1]
    found = re.fullmatch(
        rf"ptune: train: stopped \({name} received\) after step (\d+) of {STEPS} \(all 2 processes\); "
        r"\S+ holds it\. .*resumes from that step",
        last,
    )
    assert found, last
    step = int(found[1])
    assert f"train: its processes exited with rank 0: {128 + sig}, rank 1: {128 + sig}" in out, out[-4000:]
    agreed = re.findall(r"\[rank (\d)\] ptune\.stages\.train INFO stopping after step (\d+), as all 2 processes", out)
    assert sorted(agreed) == [("0", str(step)), ("1", str(step))], agreed
    (record,) = (project.root / ".ptune/state/train").glob("*/stopped.json")
    entry = json.loads(record.read_text(encoding="utf-8"))
    assert (entry["signal"], entry["step"], entry["max_steps"]) == (name, step, STEPS), entry
    assert (record.parent / f"checkpoint-{step:08d}.safetensors").is_file()
    # The curve holds every step up to the stop once, as one process's does.
    assert [int(r["step"]) for r in _rows(project)] == list(range(1, step + 1))
    return step


# Slow-marked (`make test-all`): about a minute, and the default suite stands at its 15-minute budget; the default
# suite keeps the one-process case through `dvc repro` (tests/test_stopping.py).
@pytest.mark.slow
def test_a_signal_to_the_launcher_or_to_one_worker_stops_both_processes_after_the_same_step(ran_project, tmp_path):
    p = ran_project
    p.set_param("train.devices", 2)
    p.set_param("train.max_steps", STEPS)
    p.set_param("train.logging_steps", 1)
    p.set_param("train.save_steps", 10_000)  # no periodic checkpoint: the stop's is what the rerun resumes from
    p.set_param("train.prefix_dropout", 0.1)  # each rank's RNG must be restored on resume
    p.set_param("train.learning_rate", 0.1)
    p.run("ptune", "train")
    uninterrupted = load_file(str(p.root / PREFIX))
    reference = [(r["step"], r["learning_rate"]) for r in _rows(p)]
    (p.root / PREFIX).unlink()
    (p.root / TRAIN_LOG).unlink()  # progress is read there

    # SIGTERM to the launcher: it tells its workers, which run in sessions of their own.
    code, out, took = _stop_when(p, lambda: len(_rows(p)) >= 5, signal.SIGTERM, None, tmp_path / "first.log")
    first = _check_stop(p, code, out, signal.SIGTERM)
    assert out.count("stopping at the next safe point") == 1  # the launcher says it; its workers do not repeat it
    assert 5 <= first < STEPS
    print(f"SIGTERM to the launcher: all 3 processes gone {took:.2f} s after it, stopped after step {first}")

    # SIGINT to rank 1 alone, in the resumed run: rank 0 learns of it in the step's agreement and writes.
    code, out, took = _stop_when(p, lambda: len(_rows(p)) >= first + 5, signal.SIGINT, 1, tmp_path / "second.log")
    assert "resuming from" in out and f"step {first} of {STEPS}" in out
    second = _check_stop(p, code, out, signal.SIGINT)
    assert first + 5 <= second < STEPS
    print(f"SIGINT to rank 1 alone: all 3 processes gone {took:.2f} s after it, stopped after step {second}")

    out = p.run("ptune", "train")
    assert f"step {second} of {STEPS}" in out.stderr and "resuming from" in out.stderr
    assert [(r["step"], r["learning_rate"]) for r in _rows(p)] == reference
    resumed = load_file(str(p.root / PREFIX))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.allclose(resumed[name], uninterrupted[name]), name
    assert not list((p.root / ".ptune/state/train").glob("*/*"))  # resume state and stop record removed
