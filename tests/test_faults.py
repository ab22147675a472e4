"""Fault injection: a stage SIGKILLed at a point reached by progress is never taken for complete, and the rerun
resumes (training, evaluation) and ends with exactly the outputs of an uninterrupted run.

The kill comes from the stage itself ($PTUNE_FAILPOINT, see ptune.state.faults), so it lands at the same point of
progress on every machine, whatever its speed. By default one (stage, point, front end) case is drawn per run
from a seed (printed in the test id; PTUNE_FAULT_SEED=N reproduces it, and the seed changes daily); every case:
`PTUNE_FAULT_CASES=all make test-all` (or `pytest -m faults`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess

import pytest
import yaml

from ptune.state.faults import ENV, POINTS

from conftest import make_project

FRONTS = ("snakemake", "dvc")
# Where in a point's range of hits the kill lands: the first, the middle or the last time it is passed.
WHERE = ("first", "middle", "last")


def all_cases() -> list[tuple[str, str, str, str]]:
    return [
        (stage, point, where, front)
        for stage, points in POINTS.items()
        for point in points
        for where in WHERE
        for front in FRONTS
    ]


def chosen_cases() -> list:
    cases = all_cases()
    if os.environ.get("PTUNE_FAULT_CASES") == "all":
        return [pytest.param(*c, marks=pytest.mark.faults, id="-".join(c)) for c in cases]
    seed = int(os.environ.get("PTUNE_FAULT_SEED", dt.date.today().toordinal()))
    c = random.Random(seed).choice(cases)
    return [pytest.param(*c, id=f"seed={seed}-" + "-".join(c))]


def hit_number(trace, stage: str, point: str, where: str) -> int:
    """Which pass of the point to kill at, from how often the uninterrupted run passed it."""
    count = sum(1 for line in trace.read_text().splitlines() if line == f"{stage}\t{point}")
    assert count, f"the uninterrupted run never passed {stage}:{point}"
    return {"first": 1, "middle": (count + 1) // 2, "last": count}[where]


def pipeline(front: str) -> tuple[str, ...]:
    return ("snakemake", "--cores", "1", "report") if front == "snakemake" else ("dvc", "repro")


# Outputs that carry wall-clock figures by design (DESIGN.md, "Determinism"); compared without them below.
TIMED = (
    "reports/timings",
    "reports/train_log.csv",
    "reports/live",  # live metrics carry samples/s and examples/s (docs/surviving.md, "Watching a run")
    "reports/deploy_check.json",
    "reports/report.md",
    "reports/report.html",
)


def outs_of(lock_path) -> dict[str, str]:
    """Every declared output's content hash, from dvc.lock (what 'the same outputs' means to DVC)."""
    lock = yaml.safe_load(lock_path.read_text())
    return {
        o["path"]: o["md5"]
        for st in lock["stages"].values()
        for o in st.get("outs", [])
        if not o["path"].startswith(TIMED)
    }


def loss_rows(root) -> list[list[str]]:
    """train_log.csv without its samples/s column, the one that varies between runs."""
    return [line.split(",")[:3] for line in (root / "reports/train_log.csv").read_text().splitlines()]


@pytest.mark.parametrize("stage,point,where,front", chosen_cases())
def test_killed_stage_is_rerun_and_ends_like_an_uninterrupted_run(
    stage, point, where, front, tmp_path, env, pipeline_run
):
    n = hit_number(pipeline_run.failpoint_trace, stage, point, where)
    project = make_project(tmp_path / "project", env)
    killed = subprocess.run(
        pipeline(front),
        cwd=project.root,
        env={**env, ENV: f"{stage}:{point}:{n}"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert killed.returncode != 0, f"the pipeline finished: {stage}:{point}:{n} was never reached"
    assert project.executed()[-1] == stage, "the kill landed in another stage"
    assert not (project.root / "reports/timings" / f"{stage}.json").exists() or stage == "report"

    # Neither front end takes anything the killed stage left for a finished output.
    status = json.loads(project.run("dvc", "status", "--json").stdout or "{}")
    assert stage in status, f"dvc status does not see {stage} as changed: {status}"
    dry = project.run("snakemake", "--cores", "1", "report", "--dry-run").stdout
    assert f"rule {stage}:" in dry or f"localrule {stage}:" in dry, dry[-3000:]

    # Progress that survived the kill (a training checkpoint, an evaluated batch) must be used, not redone.
    state = project.root / ".ptune" / "state" / stage
    # A temp file is not progress: a kill at the first "output" of train lands while its first checkpoint is
    # being written, and the rerun rightly starts over.
    saved_progress = (
        any(f.stat().st_size for f in state.rglob("*") if f.is_file() and ".tmp-" not in f.name)
        if state.is_dir()
        else False
    )

    project.clear_log()
    rerun = project.run(*pipeline(front), timeout=900)
    executed = project.executed()
    assert executed and executed[0] == stage, executed
    if saved_progress:
        assert "resuming" in rerun.stdout + rerun.stderr, "the rerun started over instead of resuming"

    # The same bytes as the uninterrupted session run (same tiny params, seeds and thread count).
    assert outs_of(project.root / "dvc.lock") == outs_of(pipeline_run.root / "dvc.lock")
    assert loss_rows(project.root) == loss_rows(pipeline_run.root)
    assert "up to date" in project.run("dvc", "status").stdout
    leftovers = [p.relative_to(project.root) for p in project.root.glob("**/.*.tmp-*") if ".dvc" not in p.parts]
    assert not leftovers, f"temp files left behind: {leftovers}"
