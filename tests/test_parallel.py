"""Several processes on one machine: data-parallel training and sharded evaluation, 2 CPU processes over gloo."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

PREFIX = "models/ptuning/prefix.safetensors"
EVAL_OUTPUTS = (
    "reports/predictions.jsonl",
    "reports/metrics.json",
    "reports/intervals.json",
    "reports/general.jsonl",
)


def _kill_when(project, cmd: list[str], ready) -> None:
    """Start `cmd`, SIGKILL it once `ready()` holds, and check that its worker processes die with it."""
    # A killed launcher cannot remove its temp folder (nor torch's): put them where pytest cleans up.
    tmp = project.root.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        cmd,
        cwd=project.root,
        env={**project.env, "TMPDIR": str(tmp)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    workers: list[psutil.Process] = []
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            workers = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert workers, "no worker processes were running"
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"worker processes outlived their killed launcher: {alive}"


def test_two_processes_train_one_prefix_and_resume_after_sigkill(ran_project):
    p = ran_project
    p.set_param("train.devices", 2)
    p.set_param("train.max_steps", 40)
    p.set_param("train.logging_steps", 5)
    p.set_param("train.prefix_dropout", 0.1)  # each rank's RNG must be restored on resume
    p.set_param("train.learning_rate", 0.1)  # the tiny base is barely pre-trained: loss falls slowly from ln(600)
    out = p.run("ptune", "train")
    assert "launching 2 processes" in out.stderr
    assert "effective batch: 4 per device x 1 accumulation x 2 device(s) = 8" in out.stderr
    assert p.executed() == ["train"]  # one stage run, however many processes

    # One prefix, written once: no second copy, no leftover temp directory, no checkpoints left behind.
    assert sorted(f.name for f in (p.root / "models").iterdir()) == [".gitignore", "base", "deploy", "ptuning"]
    assert sorted(f.name for f in (p.root / "models/ptuning").iterdir()) == ["prefix.safetensors", "prefix_config.json"]
    assert not list((p.root / ".ptune/state/train").glob("*/checkpoint-*.safetensors"))
    with open(p.root / "reports/train_log.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(5, 41, 5))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) - 0.02, rows
    timings = json.loads((p.root / "reports/timings/train.json").read_text())
    assert timings["devices"] == 2 and timings["effective_batch"] == 8
    uninterrupted = load_file(str(p.root / PREFIX))

    ckpts = p.root / ".ptune/state/train"

    def past_step_10() -> bool:
        return any(int(f.stem.split("-")[1]) >= 10 for f in ckpts.glob("*/checkpoint-*.safetensors"))

    _kill_when(p, ["ptune", "train"], past_step_10)
    out = p.run("ptune", "train")
    assert "resuming from" in out.stderr
    resumed = load_file(str(p.root / PREFIX))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.allclose(resumed[name], uninterrupted[name]), name


# Slow-marked for the default suite's 15 minutes (41 s): the two-process training test above keeps the launcher,
# its SIGKILL and the resume in the default suite, and tests/test_evaluate.py a killed evaluation's resume to the
# same bytes.
@pytest.mark.slow
def test_two_process_evaluation_gives_the_bytes_of_one_and_resumes_after_sigkill(ran_project):
    p = ran_project
    # One thread per process in both runs: the same floating-point sums, so greedy decoding can be compared byte
    # for byte (the launcher gives each of N workers 1/N of the cores unless PTUNE_NUM_THREADS says otherwise).
    p.env = {**p.env, "PTUNE_NUM_THREADS": "1"}
    p.set_param("evaluate.do_sample", "false")
    p.set_param("evaluate.batch_size", 1)
    p.set_param("evaluate.max_new_tokens", 48)
    p.set_param("evaluate.max_examples", "null")
    p.run("ptune", "evaluate")
    one_process = {rel: (p.root / rel).read_bytes() for rel in EVAL_OUTPUTS}
    for rel in EVAL_OUTPUTS:
        (p.root / rel).unlink()

    p.set_param("evaluate.devices", 2)
    journals = p.root / ".ptune/state/evaluate"

    def both_processes_journalled() -> bool:
        return all(any(f.read_text().strip() for f in journals.glob(f"*/*.rank{r}.jsonl")) for r in (0, 1))

    _kill_when(p, ["ptune", "evaluate"], both_processes_journalled)
    assert not any((p.root / rel).exists() for rel in EVAL_OUTPUTS)
    out = p.run("ptune", "evaluate")
    assert "launching 2 processes" in out.stderr and "resuming" in out.stderr
    assert {rel: (p.root / rel).read_bytes() for rel in EVAL_OUTPUTS} == one_process
    timings = json.loads((p.root / "reports/timings/evaluate.json").read_text())
    assert timings["devices"] == 2 and timings["device"] == "2 x cpu"
