"""The cluster profiles: resources from dvc.yaml into the rules, and a real one-node Slurm running the pipeline.

Kubernetes has no cluster here: its profile is only parsed and dry-run. The Slurm run is slow (every stage is a
Slurm job); the default suite dry-runs both profiles.
"""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import REPO, STAGES, make_project
from slurm_cluster import SlurmCluster, SlurmUnavailable

# The outputs that are not byte-stable by design (timings, throughput, latency; see README).
NOT_BYTE_STABLE = ("reports/timings", "reports/train_log.csv", "reports/deploy_check.json")


def _dvc_yaml_resources() -> dict[str, dict]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("meta", {}).get("resources", {}) for name, stage in stages.items()}


def _dry_run_resources(project, *args: str) -> dict[str, dict[str, str]]:
    """Each rule's resources as `snakemake -n` prints them."""
    out = project.run("snakemake", *args, "-n", "report").stdout
    rules = re.findall(r"^rule (\w+):\n(?:.*\n)*?\s+resources: (.*)$", out, re.M)
    assert {name for name, _ in rules} == set(STAGES), out
    return {name: dict(kv.split("=", 1) for kv in res.split(", ")) for name, res in rules}


@pytest.fixture(scope="module")
def dry_project(tmp_path_factory, env):
    # The `cluster` extra, part of `test`, needs Python >= 3.11.
    for plugin in ("snakemake_executor_plugin_slurm", "snakemake_executor_plugin_kubernetes"):
        pytest.importorskip(plugin, reason="the cluster extra is not installed (pip install -e '.[cluster]')")
    return make_project(tmp_path_factory.mktemp("cluster") / "project", env)


def test_every_stage_declares_memory_and_runtime_and_the_model_stages_a_gpu():
    resources = _dvc_yaml_resources()
    for name in STAGES:
        assert {"mem_mb", "runtime"} <= set(resources[name]), name
    assert resources["train"]["gpu"] == resources["evaluate"]["gpu"] == 1


def test_slurm_profile_carries_dvc_yaml_resources_and_cli_overrides_them(dry_project):
    declared = _dvc_yaml_resources()
    rules = _dry_run_resources(dry_project, "--profile", "profiles/slurm")
    for name in STAGES:
        for key, value in declared[name].items():
            assert rules[name][key] == str(value), (name, key, rules[name])
    overridden = _dry_run_resources(dry_project, "--profile", "profiles/slurm",
                                    "--set-resources", "train:gpu=0", "train:runtime=5", "evaluate:mem_mb=1000")
    assert overridden["train"]["gpu"] == "0" and overridden["train"]["runtime"] == "5"
    assert overridden["evaluate"]["mem_mb"] == "1000" and overridden["evaluate"]["gpu"] == "1"


def _derived_profile(project, name: str, profile: dict) -> str:
    path = project.root / ".profiles" / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(profile))
    return str(path)


def test_kubernetes_profile_parses_and_asks_for_nvidia_gpus(dry_project):
    profile = yaml.safe_load((REPO / "profiles/kubernetes/config.yaml").read_text())
    assert profile["executor"] == "kubernetes"
    assert {"default-storage-provider", "default-storage-prefix", "container-image"} <= set(profile)
    # The S3 storage plugin is not in the test venv. Without the storage keys, Snakemake accepts every other key
    # of the profile (the plugin's settings included) and stops at the one thing pods need and do not have here.
    storage = {"default-storage-provider", "default-storage-prefix"}
    no_storage = {k: v for k, v in profile.items() if k not in storage}
    proc = dry_project.run("snakemake", "--profile", _derived_profile(dry_project, "k8s", no_storage), "-n",
                           "report", check=False)
    assert proc.returncode == 1 and "default storage provider" in proc.stdout + proc.stderr, proc
    # The resources the pods would request: dvc.yaml's, plus the profile's GPU vendor.
    local = {k: v for k, v in no_storage.items() if k != "executor"}
    rules = _dry_run_resources(dry_project, "--profile", _derived_profile(dry_project, "k8s-resources", local))
    for name in ("train", "evaluate"):
        assert rules[name]["gpu"] == "1" and rules[name]["gpu_manufacturer"] == "nvidia", rules[name]
    assert rules["train"]["mem_mb"] == str(_dvc_yaml_resources()["train"]["mem_mb"])


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[cluster]' (Python >= 3.11)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as why:
        pytest.skip(f"no Slurm here: {why}")
    yield cluster
    cluster.stop()


def _out_hashes(project) -> dict[str, str]:
    """Every output path of dvc.lock with its content hash."""
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


@pytest.mark.slow
def test_slurm_runs_every_stage_as_a_job_with_the_outputs_of_a_local_run(slurm, tmp_path, env, pipeline_run):
    project = make_project(tmp_path / "project", {**slurm.client_env(env), "PTUNE_PUSH_EACH_STAGE": "1"})
    # No accounting storage here: job states come from squeue (sacct would never see a job end, see DESIGN).
    # No GPU on this node: the profile's gpu is overridden, as a user does for a CPU partition.
    proc = project.run("timeout", "-k", "10", "600", "snakemake", "report", "--profile", "profiles/slurm",
                       "--verbose", "--slurm-status-command", "squeue",
                       "--slurm-init-seconds-before-status-checks", "2", "--slurm-no-account",
                       "--set-resources", "train:gpu=0", "evaluate:gpu=0", timeout=660)
    log = proc.stdout + proc.stderr
    assert sorted(project.executed()) == sorted(STAGES)

    # Every stage went through sbatch with the resources dvc.yaml declares, and the controller ran it.
    declared = _dvc_yaml_resources()
    calls = re.findall(r"sbatch call: (sbatch .*)", log)
    by_rule = {re.search(r"--comment '?rule_(\w+?)'? ", c).group(1): c for c in calls}
    assert set(by_rule) == set(STAGES), calls
    for name, call in by_rule.items():
        assert f"--mem {declared[name]['mem_mb']}" in call and f"-t {declared[name]['runtime']}" in call, call
        assert "--gpus" not in call, call
    allocated = re.findall(r"sched: Allocate JobId=(\d+)", slurm.controller_log())
    assert len(set(allocated)) >= len(STAGES), slurm.controller_log()[-3000:]

    # The same outputs as the local run, byte for byte (by DVC's hashes), and DVC agrees the run is complete.
    mine, local = _out_hashes(project), _out_hashes(pipeline_run)
    assert set(mine) == set(local)
    stable = [rel for rel in mine if not rel.startswith(NOT_BYTE_STABLE)]
    assert {rel for rel in stable if mine[rel] != local[rel]} == set()
    assert {"models/ptuning", "models/deploy", "reports/metrics.json", "reports/report.md"} <= set(stable)
    assert "up to date" in project.run("dvc", "status").stdout
    # PTUNE_PUSH_EACH_STAGE=1: each job pushed its stage, so the shared remote holds the whole run.
    cloud = project.run("dvc", "status", "--cloud").stdout
    assert "in sync" in cloud, cloud

