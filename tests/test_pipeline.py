"""The two front ends and the one cache, run for real: snakemake, dvc and git on a copy of the project."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import STAGES, make_project


def test_snakemake_report_runs_every_stage_once_in_order(pipeline_run):
    executed = pipeline_run.executed()
    assert sorted(executed) == sorted(STAGES)
    # The two fetches are independent; everything after them is a chain.
    assert set(executed[:2]) == {"fetch_weights", "fetch_data"}
    assert executed[2:] == list(STAGES[2:])


def test_outputs_are_complete(pipeline_run):
    root = pipeline_run.root
    metrics = json.loads((root / "reports/metrics.json").read_text())
    for model in ("base", "ptuned"):
        assert set(metrics[model]) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    assert metrics["n_examples"] == 6
    assert set(metrics["empty_predictions"]) == {"base", "ptuned"}
    rows = [json.loads(line) for line in (root / "reports/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(set(r) == {"content", "label", "base", "ptuned"} for r in rows)
    assert (root / "reports/train_log.csv").read_text().splitlines()[0] == "step,loss,learning_rate,samples_per_s"
    assert (root / "models/ptuning/prefix.safetensors").is_file()
    assert json.loads((root / "models/ptuning/prefix_config.json").read_text())["pre_seq_len"] == 4
    check = json.loads((root / "reports/deploy_check.json").read_text())
    assert {"answer", "latency_s", "prompt", "bundle"} <= set(check)
    report = (root / "reports/report.md").read_text()
    assert "| P-tuned |" in report and "data:image/png;base64," in report
    assert (root / "reports/report.html").is_file()
    timings = json.loads((root / "reports/timings.json").read_text())
    assert set(timings) == set(STAGES)
    # Timings never leak into what reruns compare byte for byte.
    assert "wall_s" not in (root / "reports/metrics.json").read_text()


def test_no_partial_outputs_left_behind(pipeline_run):
    leftovers = [p for p in pipeline_run.root.rglob(".*tmp-*")]
    assert not leftovers


def test_after_snakemake_dvc_is_clean_and_repro_executes_nothing(ran_project):
    status = ran_project.run("dvc", "status").stdout
    assert "up to date" in status, status
    ran_project.run("dvc", "repro")
    assert ran_project.executed() == []


def test_snakemake_again_executes_nothing(ran_project):
    ran_project.run("snakemake", "--cores", "1", "report")
    assert ran_project.executed() == []


def test_evaluate_param_reruns_evaluate_and_downstream_only(ran_project):
    # max_examples changes metrics.json (n_examples) for sure, so deploy, which depends on it, reruns too; an edit of
    # max_new_tokens may leave the tiny model's scores, and so deploy, as they were.
    ran_project.set_param("evaluate.max_examples", 5)
    ran_project.run("dvc", "repro")
    assert ran_project.executed() == ["evaluate", "deploy", "report"]


# Slow-marked for the default suite's 15 minutes (48 s): the test above keeps "a param edit reruns its stage and what
# follows, nothing before", and test_dvc_repro_from_scratch_reproduces_snakemake_bytes_and_agrees that Snakemake and DVC
# agree on one cache.
@pytest.mark.slow
def test_learning_rate_never_reruns_fetch_or_preprocess(ran_project):
    ran_project.set_param("train.learning_rate", 0.01)
    ran_project.run("dvc", "repro")
    executed = ran_project.executed()
    assert executed == ["train", "evaluate", "deploy", "report"]
    # Then Snakemake agrees that everything is up to date: DVC is the one cache.
    ran_project.clear_log()
    ran_project.run("snakemake", "--cores", "1", "report")
    assert ran_project.executed() == []
    assert "up to date" in ran_project.run("dvc", "status").stdout


# Slow-marked for the default suite's 15 minutes: the next test makes the same edit, runs the same `snakemake
# report` (after a failed one) and checks the same three stages and that DVC then sees nothing to do.
@pytest.mark.slow
def test_param_edit_seen_by_snakemake_first(ran_project):
    ran_project.set_param("evaluate.max_examples", 5)
    ran_project.run("snakemake", "--cores", "1", "report")
    assert ran_project.executed() == ["evaluate", "deploy", "report"]
    ran_project.clear_log()
    ran_project.run("dvc", "repro")
    assert ran_project.executed() == []


def test_a_stage_that_fails_after_a_param_edit_is_retried_by_the_next_run(ran_project):
    p = ran_project
    p.set_param("evaluate.max_examples", 5)
    # The stage kills itself at its first evaluated batch (ptune/state/faults.py): a failed job, old outputs on disk.
    env, p.env = p.env, {**p.env, "PTUNE_FAILPOINT": "evaluate:batch:1"}
    proc = p.run("snakemake", "--cores", "1", "report", check=False)
    p.env = env
    assert proc.returncode != 0
    p.clear_log()
    p.run("snakemake", "--cores", "1", "report")
    assert p.executed() == ["evaluate", "deploy", "report"]
    assert "up to date" in p.run("dvc", "status").stdout


def _tree_bytes(root, rel):
    """Every file under root/rel (or the file itself) with its bytes; Snakemake's marker files left out."""
    base = root / rel
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.name != ".snakemake_timestamp"}


def test_dvc_repro_from_scratch_reproduces_snakemake_bytes_and_agrees(tmp_path, env, pipeline_run):
    project = make_project(tmp_path / "project", env)
    project.run("dvc", "repro")
    assert sorted(project.executed()) == sorted(STAGES)
    # Same seeds, same threads: the same models, data and predictions, byte for byte.
    for rel in (
        "models/base",
        "models/ptuning",
        "data/raw",
        "data/processed",
        "reports/predictions.jsonl",
        "reports/metrics.json",
    ):
        assert _tree_bytes(project.root, rel) == _tree_bytes(pipeline_run.root, rel), rel
    project.clear_log()
    project.run("snakemake", "--cores", "1", "report")
    assert project.executed() == []
    assert "up to date" in project.run("dvc", "status").stdout


def test_lost_output_is_restored_from_cache_not_recomputed(ran_project):
    import shutil

    shutil.rmtree(ran_project.root / "models/ptuning")
    # Targeted: with `report` as target Snakemake (like make) leaves a lost intermediate alone while every
    # final output is up to date; `dvc checkout` would also bring it back.
    ran_project.run("snakemake", "--cores", "1", "train")
    assert ran_project.executed() == []
    assert (ran_project.root / "models/ptuning/prefix.safetensors").is_file()


def _dot_edges(dot: str) -> set[tuple[str, str]]:
    """Edges of a DOT graph, with node ids resolved to their labels."""
    labels = dict(re.findall(r'^\s*"?([\w.]+)"?\s*\[.*?label\s*=\s*"([^"]+)"', dot, re.M))
    edges = re.findall(r'^\s*"?([\w.]+)"?\s*->\s*"?([\w.]+)"?', dot, re.M)
    return {(labels.get(a, a).replace(".dvc", "").strip(), labels.get(b, b).strip()) for a, b in edges}


def test_snakemake_dag_matches_dvc_dag(pipeline_run):
    sm = _dot_edges(pipeline_run.run("snakemake", "--rulegraph", "dot", "report").stdout)
    dvc = _dot_edges(pipeline_run.run("dvc", "dag", "--dot").stdout)
    assert sm == dvc and len(sm) >= 6, (sm, dvc)


def test_dvc_yaml_params_are_exactly_the_stage_sections():
    from conftest import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        if name == "report":
            continue  # the report shows every param
        sections = {p.split(".")[0] for p in stage["params"]}
        assert name in sections, f"{name} does not depend on its own params section"
        assert stage["cmd"] == f"ptune {name}"


def test_bad_params_fail_at_once_naming_the_key(ran_project):
    ran_project.set_param("train.learning_rate", -1)
    proc = ran_project.run("snakemake", "--cores", "1", "report", check=False)
    assert proc.returncode != 0
    assert "learning_rate" in proc.stdout + proc.stderr
    proc = ran_project.run("ptune", "train", check=False)
    assert proc.returncode == 2
    assert "train.learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    assert ran_project.executed() == []  # refused before it started: nothing logged, nothing written


def test_ptune_help_lists_the_stages(ran_project):
    out = ran_project.run("ptune", "--help").stdout
    for stage in STAGES:
        assert stage in out


def _commit_pipeline_state(project) -> None:
    """What a user commits after a run: dvc.lock and the .gitignore files DVC wrote."""
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "pipeline run")


# Slow: it recomputes the whole pipeline; restoring without recomputing is the default suite's (test_survival.py).
@pytest.mark.slow
def test_fresh_clone_with_lock_but_no_remote_data_recomputes(ran_project, tmp_path):
    _commit_pipeline_state(ran_project)
    # A clone in another directory: its default remote (a sibling directory) is empty.
    clone_parent = tmp_path / "elsewhere"
    clone_parent.mkdir()
    ran_project.run("git", "clone", "-q", str(ran_project.root), str(clone_parent / "project"))
    from conftest import Project

    clone = Project(clone_parent / "project", ran_project.env)
    clone.run("snakemake", "--cores", "1", "report")
    assert sorted(clone.executed()) == sorted(STAGES)


def test_pushed_run_restores_on_a_fresh_clone_without_recomputing(ran_project):
    _commit_pipeline_state(ran_project)
    ran_project.run("dvc", "push")
    # The default remote is ../ptune-dvc-storage: a clone beside the first one shares it.
    sibling = ran_project.root.parent / "fresh-instance"
    ran_project.run("git", "clone", "-q", str(ran_project.root), str(sibling))
    from conftest import Project

    clone = Project(sibling, ran_project.env)
    clone.run("snakemake", "--cores", "1", "report")
    assert clone.executed() == []
    assert (sibling / "models/ptuning/prefix.safetensors").is_file()
    assert "up to date" in clone.run("dvc", "status").stdout
