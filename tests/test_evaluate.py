"""Evaluation resumes after SIGKILL (triggered by progress, not time) and ends with the same bytes."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

OUTPUTS = ("reports/predictions.jsonl", "reports/metrics.json", "reports/intervals.json", "reports/general.jsonl")


def _kill_after_batches(project, n_batches: int) -> int:
    """Start `ptune evaluate`, SIGKILL it once its journal holds `n_batches` finished batches."""
    proc = subprocess.Popen(
        ["ptune", "evaluate"], cwd=project.root, env=project.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    state = project.root / ".ptune" / "state" / "evaluate"
    while proc.poll() is None and time.monotonic() < deadline:
        done = sum(len(p.read_text().splitlines()) for p in state.glob("*/*.jsonl")) if state.is_dir() else 0
        if done >= n_batches:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "evaluation finished before it could be killed; make it slower"
    return done


# Sampling too (seeded per batch), in the slow suite: the default suite's 2-process evaluation resumes as well.
@pytest.mark.parametrize(
    "do_sample", ["false", pytest.param("true", marks=pytest.mark.slow)], ids=["greedy", "sampling"]
)
def test_killed_evaluation_resumes_to_identical_outputs(ran_project, do_sample):
    p = ran_project
    p.set_param("evaluate.do_sample", do_sample)
    p.set_param("evaluate.batch_size", 1)
    p.set_param("evaluate.max_new_tokens", 32)
    p.set_param("evaluate.max_examples", 16)  # 16 one-example batches per model: room to be killed after 3
    p.run("ptune", "evaluate")
    uninterrupted = {rel: (p.root / rel).read_bytes() for rel in OUTPUTS}
    assert not (p.root / ".ptune/state/evaluate").exists() or not any((p.root / ".ptune/state/evaluate").iterdir())
    for rel in OUTPUTS:
        (p.root / rel).unlink()

    done = _kill_after_batches(p, n_batches=3)
    # Killed: nothing that looks complete, no temp files presented as outputs.
    assert not any((p.root / rel).exists() for rel in OUTPUTS)
    proc = p.run("ptune", "evaluate")
    assert "resuming" in proc.stderr
    resumed = int(proc.stderr.split("resuming, ")[1].split(" of ")[0])
    assert resumed >= min(done, 8) and resumed >= 3
    assert {rel: (p.root / rel).read_bytes() for rel in OUTPUTS} == uninterrupted


def test_timings_carry_examples_per_second(pipeline_run):
    rec = json.loads((pipeline_run.root / "reports/timings/evaluate.json").read_text())
    assert set(rec["examples_per_s"]) == {"base", "ptuned"} and rec["wall_s"] > 0


def test_generation_past_the_model_context_is_refused_before_generating(ran_project):
    p = ran_project
    before = (p.root / "reports/predictions.jsonl").read_bytes()
    p.set_param("evaluate.max_new_tokens", 700)  # the tiny model's context is 512 positions
    proc = p.run("ptune", "evaluate", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.split("ptune: error: ", 1)[-1]
    # The numbers (prefix, prompt, new tokens, context), where the context comes from, and the params to lower.
    for named in (
        "prefix (4 positions, train.pre_seq_len",
        "evaluate.max_new_tokens (700)",
        "context of 512 (models/base/config.json: max_position_embeddings)",
        "preprocess.max_source_length",
    ):
        assert named in message, message
    longest = int(message.split("longest dev prompt (")[1].split(" tokens")[0])
    assert f"lower evaluate.max_new_tokens to at most {512 - 4 - longest}" in message
    # Refused before generating: no batch journalled, the outputs of the last run untouched.
    assert not [f for f in (p.root / ".ptune/state/evaluate").rglob("*") if f.is_file()]
    assert (p.root / "reports/predictions.jsonl").read_bytes() == before
