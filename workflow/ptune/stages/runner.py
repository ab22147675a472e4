"""`ptune STAGE`: one stage, as dvc.yaml's command runs it, in the code and environment it must run in.

- The project's own code: a stage runs the package in the project it runs in (./workflow/ptune), the files dvc.yaml
  lists as its deps and DVC hashed, never another checkout's that happens to be installed. A queued or temporary
  DVC experiment (a copy of the project under .dvc/tmp/exps/), a pod (the sources archive) and a second clone
  sharing one venv each run their own. The processes a stage starts (its workers, deploy's server, the legacy
  environment) get the same code through PYTHONPATH.
- The base model's environment, for a stage that loads it (model/legacy_env.py: ChatGLM-6B's remote code).
- Its params and only those: config.load hands the stage, and every process it starts (PTUNE_STAGE), the keys it
  declares (pipeline/declared.py), so that dvc.yaml's params are what it reads.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from .. import config
from ..pipeline.declared import BY_NAME
from ..state import determinism, faults, locks, stagelog, stopping

PACKAGE = Path(__file__).resolve().parents[1]


def _with_pythonpath(folder: Path) -> dict[str, str]:
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != folder]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *rest])}


def run_project_code(argv: list[str]) -> None:
    """Re-execute `python -m ptune.cli argv` on ./workflow/ptune when this process runs another copy of the package;
    then export it on PYTHONPATH for the processes the stage starts."""
    project = (Path.cwd() / "workflow" / "ptune").resolve()
    if not (project / "__init__.py").is_file() or project == PACKAGE:
        if project == PACKAGE:
            os.environ.update(_with_pythonpath(PACKAGE.parent))
        return
    env = _with_pythonpath(project.parent)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "ptune.cli", *argv], env)


def run(stage: str, params_path: str, argv: list[str]) -> None:
    run_project_code(argv)
    if BY_NAME[stage].model_env:
        from . import environment  # only a stage that loads the model runs it (pipeline/code.py)

        environment.enter(argv)
    os.environ[config.STAGE_ENV] = stage  # the params scope of every process the stage starts
    params = config.load(params_path, stage=stage)  # bad params fail before anything is recorded or locked
    faults.arm(stage)
    stopping.install(stage)  # SIGTERM, SIGINT, SIGHUP: a clean stop, with progress kept where it can be
    with locks.stage_lock(stage):
        stagelog.record_start(stage)
        determinism.configure_threads()
        module = importlib.import_module(f"ptune.stages.{stage}")
        if stage == "report":
            module.run(params)  # it writes reports/timings.json, its own timing included
            return
        with stagelog.timed(stage) as facts:
            facts.update(module.run(params) or {})
