"""What Kubernetes pods receive and run, made by Snakemake's and the Kubernetes plugin's own code, with no cluster.

The main Snakemake process, for `--executor kubernetes`, uploads the workflow's sources archive to the default
storage (Workflow.upload_sources) and gives each pod the shell command the plugin builds (Executor.format_job_exec),
run with `/bin/sh -c` in an empty /workdir. Here both come from that code: the storage is the `fs` storage plugin
(a directory standing in for a bucket) and the plugin's Executor is made without its Kubernetes API client, which
only submitting would use.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from snakemake.api import SnakemakeApi
from snakemake.settings.enums import Quietness
from snakemake.settings.types import (
    DAGSettings,
    ExecutionSettings,
    GroupSettings,
    OutputSettings,
    RemoteExecutionSettings,
    ResourceSettings,
    SchedulingSettings,
    StorageSettings,
)
from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

# The step of the pod command that installs the storage plugin into the pod from PyPI: the test venv has it already
# and tests reach no registry, so it is left out (the only part of the command not run here).
PIP_STEP = re.compile(r"pip install --target '\.snakemake/pip-deployments' [^&]+&& ")


def pod_commands(project_root: Path, store: Path, envvars: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """For `snakemake --executor kubernetes --envvars ENVVARS... report` in `project_root`, with `store` as the
    default storage (the sources archive is uploaded there): rule name -> the exact `sh -c` command of its pod,
    and the variables the plugin puts into every pod's environment (through a Kubernetes secret)."""
    import os

    from snakemake_executor_plugin_kubernetes import Executor

    class NoApiExecutor(Executor):
        def __post_init__(self):  # the plugin's loads a kube config and creates a secret: nothing to build a command
            pass

    cwd = os.getcwd()
    os.chdir(project_root)
    try:
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            storage = StorageSettings(
                default_storage_provider="fs", default_storage_prefix=str(store), shared_fs_usage=frozenset()
            )
            workflow_api = api.workflow(
                resource_settings=ResourceSettings(cores=1), storage_settings=storage, snakefile=Path("Snakefile")
            )
            workflow_api.dag(DAGSettings(targets={"report"}))
            workflow = workflow_api._workflow
            # What `execute_workflow` would set, with Snakemake's defaults.
            workflow.remote_execution_settings = RemoteExecutionSettings(job_deploy_sources=True, envvars=envvars)
            workflow.execution_settings = ExecutionSettings()
            workflow.scheduling_settings = SchedulingSettings()
            workflow.group_settings = GroupSettings()
            workflow._executor_plugin = ExecutorPluginRegistry().get_plugin("kubernetes")
            workflow._prepare_dag(forceall=True, ignore_incomplete=False, lock_warn_only=False, nolock=True)
            workflow._build_dag()
            workflow.upload_sources()
            executor = NoApiExecutor(workflow, _logger())
            try:
                return ({job.rule.name: executor.format_job_exec(job) for job in workflow.dag.jobs}, executor.envvars())
            finally:
                executor.wait = False
    finally:
        os.chdir(cwd)


def _logger():
    from snakemake.logging import logger

    return logger


def run_pod(command: str, workdir: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a pod's command as the pod does (`/bin/sh -c`, in an empty work dir), less the PyPI step."""
    workdir.mkdir(parents=True)
    return subprocess.run(
        ["/bin/sh", "-c", PIP_STEP.sub("", command)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


if __name__ == "__main__":
    # `python k8s_pods.py PROJECT STORE VAR...`: the commands and pod environment as JSON, computed in a process of
    # their own (Snakemake's API changes directory and global state).
    import json
    import sys

    commands, pod_env = pod_commands(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
    print(json.dumps({"commands": commands, "env": pod_env}))
