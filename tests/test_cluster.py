"""The cluster profiles: resources from dvc.yaml into the rules, and a real one-node Slurm running the pipeline.

Kubernetes has no cluster here: its profile is parsed and dry-run, and the commands its pods would run (built by
Snakemake's and the plugin's own code) run for real, each in an empty directory that holds only what a pod gets.
The Slurm run and the whole pipeline through pods are slow; the default suite dry-runs both profiles and runs two
pods.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ptune.pipeline.declared import BY_NAME

from conftest import REPO, STAGES, make_project
from support.k8s_pods import run_pod
from support.slurm_cluster import SlurmCluster, SlurmUnavailable

# The outputs that are not byte-stable by design (timings, throughput, latency; see docs/pipeline.md).
# Outputs that carry wall times (and the report, when and where it was written) and so differ between two runs.
NOT_BYTE_STABLE = (
    "reports/timings",
    "reports/train_log.csv",
    "reports/live",
    "reports/deploy_check.json",
    "reports/report.",
)


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
    overridden = _dry_run_resources(
        dry_project,
        "--profile",
        "profiles/slurm",
        "--set-resources",
        "train:gpu=0",
        "train:runtime=5",
        "evaluate:mem_mb=1000",
    )
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
    # The profile's envvars (credentials the pods get) must be set where Snakemake starts.
    dry_project.env = {**dry_project.env, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    proc = dry_project.run(
        "snakemake", "--profile", _derived_profile(dry_project, "k8s", no_storage), "-n", "report", check=False
    )
    assert proc.returncode == 1 and "default storage provider" in proc.stdout + proc.stderr, proc
    # The resources the pods would request: dvc.yaml's, plus the profile's GPU vendor.
    local = {k: v for k, v in no_storage.items() if k != "executor"}
    rules = _dry_run_resources(dry_project, "--profile", _derived_profile(dry_project, "k8s-resources", local))
    for name in ("train", "evaluate"):
        assert rules[name]["gpu"] == "1" and rules[name]["gpu_manufacturer"] == "nvidia", rules[name]
    assert rules["train"]["mem_mb"] == str(_dvc_yaml_resources()["train"]["mem_mb"])
    # With a default storage (a directory here, S3 in the profile), each rule's one output is the stage's record.
    if importlib.util.find_spec("snakemake_storage_plugin_fs"):
        fs = {**local, "default-storage-provider": "fs", "default-storage-prefix": str(dry_project.root / ".s")}
        out = dry_project.run(
            "snakemake", "--profile", _derived_profile(dry_project, "k8s-fs", fs), "-n", "report"
        ).stdout
        outputs = re.findall(r"^\s+output: (.*)$", out, re.M)
        assert len(outputs) == len(STAGES) and all(
            re.search(r"\.ptune/pods/\w+/\w+\.lock\.yaml", o) for o in outputs
        ), out


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
    proc = project.run(
        "timeout",
        "-k",
        "10",
        "600",
        "snakemake",
        "report",
        "--profile",
        "profiles/slurm",
        "--verbose",
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--slurm-no-account",
        "--set-resources",
        "train:gpu=0",
        "evaluate:gpu=0",
        timeout=660,
    )
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
    assert {"models/ptuning", "models/deploy", "reports/metrics.json", "reports/predictions.jsonl"} <= set(stable)
    assert "up to date" in project.run("dvc", "status").stdout
    # PTUNE_PUSH_EACH_STAGE=1: each job pushed its stage, so the shared remote holds the whole run.
    cloud = project.run("dvc", "status", "--cloud").stdout
    assert "in sync" in cloud, cloud


class Pods:
    """A project as a user submits it to Kubernetes, the commands its pods get, and where their files go."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.project = make_project(root / "project", env)
        # The DVC remote the pods share: an absolute directory stands in for the bucket (or a volume every pod
        # mounts). Committed, as a user commits it: the pods get .dvc/config from the sources archive.
        self.remote = root / "dvc-remote"
        self.project.run("dvc", "remote", "add", "-d", "-f", "shared", str(self.remote))
        self.project.run("git", "commit", "-qam", "the shared DVC remote")
        self.store = root / "snakemake-storage"  # Snakemake's default storage (an S3 bucket on a real cluster)
        script = Path(__file__).parent / "support" / "k8s_pods.py"
        out = subprocess.run(
            [sys.executable, str(script), str(self.project.root), str(self.store), "DVC_NO_ANALYTICS"],
            cwd=self.project.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        found = json.loads(out.stdout.strip().splitlines()[-1])
        self.commands, self.pod_env = found["commands"], found["env"]
        # The image's environment (the venv on PATH) plus what the plugin passes through its secret.
        self.env = {**env, **self.pod_env}
        self.count = 0

    def run(self, stage: str) -> Path:
        self.count += 1
        workdir = self.root / "pods" / f"{self.count}-{stage}"
        proc = run_pod(self.commands[stage], workdir, self.env)
        assert proc.returncode == 0, f"pod {stage}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return workdir

    def record(self, stage: str) -> dict:
        found = list(self.store.glob(f".ptune/pods/*/{stage}.lock.yaml"))
        assert len(found) == 1, found
        return yaml.safe_load(found[0].read_text())[stage]

    def on_remote(self, md5: str) -> bool:
        return (self.remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def _executed(workdir: Path) -> list[str]:
    from ptune.state.stagelog import executed_stages

    return executed_stages(workdir / ".ptune" / "stage.log")


@pytest.fixture(scope="module")
def pods(tmp_path_factory, env):
    for plugin in ("snakemake_executor_plugin_kubernetes", "snakemake_storage_plugin_fs"):
        pytest.importorskip(plugin, reason="pip install -e '.[test]' (Python >= 3.11)")
    return Pods(tmp_path_factory.mktemp("k8s"), env)


def test_kubernetes_pod_gets_the_sources_pushes_its_stage_and_a_later_pod_restores_it(pods):
    assert set(pods.commands) == set(STAGES)
    assert all("--deploy-sources" in c and "--mode 'remote'" in c for c in pods.commands.values())
    assert pods.pod_env == {"DVC_NO_ANALYTICS": "1"}  # only what --envvars names reaches a pod

    first = pods.run("fetch_data")
    assert not (first / ".git").exists() and (first / "dvc.lock").is_file()  # the archive: tracked files, no git
    assert _executed(first) == ["fetch_data"]
    record = pods.record("fetch_data")  # the rule's output, in Snakemake's storage: the stage's dvc.lock entry
    outs = [out for out in record["outs"]]
    assert {out["path"] for out in outs} == {str(p) for p in BY_NAME["fetch_data"].outputs}
    assert all(pods.on_remote(out["md5"]) for out in outs), outs  # pushed, with the run-cache

    # Another pod (a retry, or the same stage in a later run) restores the stage from the remote: nothing runs.
    second = pods.run("fetch_data")
    assert _executed(second) == []
    assert (second / "data/raw/train.json").read_bytes() == (first / "data/raw/train.json").read_bytes()

    # The submitting side: its dvc.lock is the one it submitted; DVC restores the stage and writes the lock.
    pods.project.clear_log()
    pods.project.run("dvc", "repro", "--pull", "fetch_data")
    assert pods.project.executed() == []
    assert "up to date" in pods.project.run("dvc", "status", "fetch_data").stdout


@pytest.mark.slow
def test_kubernetes_pods_run_the_pipeline_each_its_own_stage_with_the_outputs_of_a_local_run(pods, pipeline_run):
    for stage in STAGES:  # dvc.yaml's order is a topological order; each pod starts empty
        workdir = pods.run(stage)
        assert _executed(workdir) in ([stage], []), (stage, _executed(workdir))  # fetch_data ran above
        assert all(pods.on_remote(out["md5"]) for out in pods.record(stage)["outs"]), stage
    project = pods.project
    project.clear_log()
    project.run("dvc", "repro", "--pull", "report")
    assert project.executed() == []
    assert "up to date" in project.run("dvc", "status").stdout
    mine, local = _out_hashes(project), _out_hashes(pipeline_run)
    # The report made in a pod names no git commit (a pod has no .git), so it differs from a local run's there.
    stable = [rel for rel in mine if not rel.startswith(NOT_BYTE_STABLE)]
    assert {rel for rel in stable if mine[rel] != local[rel]} == set()
    assert {"models/ptuning", "models/deploy", "reports/metrics.json"} <= set(stable)
