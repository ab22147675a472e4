"""Experiments as a user runs them: `dvc exp run -S ...` on the pipeline, reusing unaffected stages from the
cache; `dvc exp show`, `dvc metrics diff` and `dvc plots diff` list them; `ptune compare` lays them side by side."""

from __future__ import annotations

import json

import pytest


def _commit_run(project) -> None:
    """An experiment's baseline is a commit: the finished run with its dvc.lock."""
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "pipeline run")


def _experiments(project) -> dict[str, dict]:
    """Experiment name -> {params, metrics} from `dvc exp show --json`."""
    found = {}
    for baseline in json.loads(project.run("dvc", "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                found[rev["name"]] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": data["metrics"]["reports/metrics.json"]["data"],
                }
    return found


def test_experiment_reruns_only_affected_stages_and_is_compared(ran_project):
    """A report-only change keeps this in the default suite; the slow test below trains twice."""
    _commit_run(ran_project)
    ran_project.run("dvc", "exp", "run", "-n", "more-examples", "-S", "report.n_random=1")
    assert ran_project.executed() == ["report"]  # every other stage: from the cache

    exps = _experiments(ran_project)
    assert exps["more-examples"]["params"]["report"]["n_random"] == 1
    assert set(exps["more-examples"]["metrics"]["ptuned"]) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}

    # The experiment is applied to the work tree: DVC compares it with the commit it started from.
    diff = json.loads(ran_project.run("dvc", "metrics", "diff", "--all", "--json").stdout)
    assert {"ptuned.rouge-l", "base.bleu-4"} <= set(diff["reports/metrics.json"])
    plots = json.loads(ran_project.run("dvc", "plots", "diff", "HEAD", "--json").stdout)["data"]
    assert set(plots["scores"][0]["revisions"]) == {"HEAD", "workspace"}

    out = ran_project.run("ptune", "compare").stdout
    assert "more-examples" in out and "report.n_random" in out
    page = (ran_project.root / "reports/compare.html").read_text()
    assert "more-examples" in page and "data:image/png;base64," in page
    assert (ran_project.root / "reports/compare.png").stat().st_size > 10_000
    assert ran_project.executed() == ["report"]  # comparing computes nothing

    proc = ran_project.run("ptune", "compare", "no-such-exp", check=False)
    assert proc.returncode == 2 and "no-such-exp" in proc.stderr and "more-examples" in proc.stderr


@pytest.mark.slow
def test_two_training_experiments_compared(ran_project):
    """The brief's case: prefix length and learning rate, each a real training run of the tiny model."""
    _commit_run(ran_project)
    ran_project.run("dvc", "exp", "run", "-n", "prefix-8", "-S", "train.pre_seq_len=8")
    assert ran_project.executed() == ["train", "evaluate", "deploy", "report"]
    # Back to the baseline before the next one, which would otherwise start from this one's params.
    ran_project.run("git", "checkout", "--", ".")
    ran_project.run("dvc", "checkout", "--force")
    ran_project.clear_log()
    ran_project.run("dvc", "exp", "run", "-n", "lr-0.05", "-S", "train.learning_rate=0.05")
    assert ran_project.executed() == ["train", "evaluate", "deploy", "report"]

    exps = _experiments(ran_project)
    assert exps["prefix-8"]["params"]["train"]["pre_seq_len"] == 8
    assert exps["prefix-8"]["params"]["train"]["learning_rate"] == 0.02
    assert exps["lr-0.05"]["params"]["train"]["learning_rate"] == 0.05
    assert exps["lr-0.05"]["params"]["train"]["pre_seq_len"] == 4

    out = ran_project.run("ptune", "compare", "prefix-8", "lr-0.05").stdout
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert set(lines) >= {"prefix-8", "lr-0.05"}
    header = out.splitlines()[0].split()
    assert header[:2] == ["train.pre_seq_len", "train.learning_rate"] or set(header[:2]) == {
        "train.pre_seq_len",
        "train.learning_rate",
    }
    # Their training curves differ, so their final losses do.
    assert lines["prefix-8"][-1] != lines["lr-0.05"][-1]
    assert "final loss" in out
