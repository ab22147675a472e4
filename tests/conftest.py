"""Shared fixtures: a copy of the project in a temp dir, run for real with snakemake, dvc and git.

The pipeline runs once per test session (`pipeline_run`, tiny params); tests that change things work on
their own copy of that finished project (`ran_project`), which keeps the suite fast.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ptune.pipeline.declared import NAMES as STAGES  # noqa: F401  (tests import the one list of stages from here)
from ptune.state.faults import TRACE_ENV
from ptune.state.stagelog import executed_stages

REPO = Path(__file__).resolve().parents[1]
TINY_PARAMS = REPO / "tests" / "fixtures" / "params-tiny.yaml"
IMPORT_TRACE = REPO / "tests" / "support" / "import_trace"  # its sitecustomize.py records what each process imports
SHARED_ADGEN = REPO.parent / "shared" / "data" / "adgen"  # the whole dev split, where a machine has it
# 100 train and 100 dev lines of the real ADGEN, shipped so that every machine runs the same tests (its README).
ADGEN_SAMPLE = REPO / "tests" / "fixtures" / "adgen"

# A suite started in the background (`make test &` from a script, `nohup make test`) inherits SIGINT and SIGHUP
# ignored, and an ignored signal stays ignored in every program it starts: the tests that press Ctrl-C in `ptune
# chat` or send SIGINT or SIGHUP to a run would then wait for a stop that never comes. The tests send these signals
# themselves, so every command they run gets the default dispositions back.
for _sig, _default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGHUP, signal.SIG_DFL)):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, _default)


def project_files() -> list[str]:
    """What a fresh clone holds: tracked files plus new ones git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [p for p in out.split("\0") if p and (REPO / p).is_file()]


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict[str, str]:
    """The environment of every command a test runs: the venv first on PATH, a private HOME and git config."""
    home = tmp_path_factory.mktemp("home")
    gitconfig = home / ".gitconfig"
    gitconfig.write_text(
        "[user]\n\tname = ptune tests\n\temail = tests@ptune.invalid\n[init]\n\tdefaultBranch = main\n",
        encoding="utf-8",
    )
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "GIT_CONFIG_GLOBAL": str(gitconfig),
        "GIT_CONFIG_NOSYSTEM": "1",
        "DVC_NO_ANALYTICS": "1",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        # The RAM-role credential helper (ptune credentials ram-role) never reaches 100.100.100.200 from a test.
        "PTUNE_METADATA_URL": "http://127.0.0.1:9",
    }


class Project:
    """A project checkout in a temp dir, with helpers to run the commands a user runs in it."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env

    def run(self, *cmd: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                f"\n--- stderr\n{proc.stderr[-6000:]}"
            )
        return proc

    @property
    def stage_log(self) -> Path:
        return self.root / ".ptune" / "stage.log"

    def executed(self) -> list[str]:
        """Stages executed since the log was last cleared (the one definition: ptune.state.stagelog)."""
        return executed_stages(self.stage_log)

    def clear_log(self) -> None:
        if self.stage_log.exists():
            self.stage_log.write_text("")

    def set_param(self, dotted: str, value) -> None:
        """Edit one key of params.yaml in place, as a user would with an editor (comments kept)."""
        import re

        path = self.root / "params.yaml"
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        section, key = dotted.split(".")
        in_section = False
        for i, line in enumerate(lines):
            if re.match(rf"^{section}:", line):
                in_section = True
            elif in_section and re.match(r"^\S", line):
                break
            elif in_section and re.match(rf"^\s+{key}:", line):
                indent = line[: len(line) - len(line.lstrip())]
                lines[i] = f"{indent}{key}: {value}\n"
                path.write_text("".join(lines), encoding="utf-8")
                return
        raise KeyError(dotted)


def make_project(dest: Path, env: dict[str, str], params: Path = TINY_PARAMS) -> Project:
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    shutil.copy2(params, dest / "params.yaml")
    project = Project(dest, env)
    project.run("git", "init", "-q")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "fresh checkout")
    return project


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, env) -> Project:
    """The tiny pipeline, run once by `snakemake --cores 1 report`; do not modify it (use `ran_project`)."""
    root = tmp_path_factory.mktemp("pipeline")
    project = make_project(root / "project", env)
    # Record every failpoint this run passes (ptune.state.faults), so the fault suite aims its kills at real progress.
    project.failpoint_trace = root / "failpoints.tsv"
    # Credentials as a user's shell would hold them: no output, log, lock or report may ever contain them.
    # Made at run time: a literal here would be found in the copy of this file that the project holds.
    project.planted_secret = "ptune-planted-" + os.urandom(8).hex()
    secrets = {
        name: project.planted_secret
        for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "OSS_ACCESS_KEY_SECRET", "OPENAI_API_KEY")
    }
    # Every ptune module each process of the run imports, and for which stage (tests/test_code_deps.py).
    project.import_trace = root / "imports.jsonl"
    imports = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(IMPORT_TRACE), env.get("PYTHONPATH")])),
        "PTUNE_TEST_IMPORT_TRACE": str(project.import_trace),
    }
    project.env = {**env, **secrets, **imports, TRACE_ENV: str(project.failpoint_trace)}
    project.run("snakemake", "--cores", "1", "report")
    project.env = env
    return project


@pytest.fixture
def ran_project(pipeline_run, tmp_path) -> Project:
    """A private copy of the finished pipeline (DVC cache, git, mtimes and all) with an empty stage log."""
    dest = tmp_path / "project"
    shutil.copytree(pipeline_run.root, dest, symlinks=True)
    project = Project(dest, pipeline_run.env)
    project.clear_log()
    return project


@pytest.fixture(scope="session")
def serving_project(pipeline_run, tmp_path_factory) -> Project:
    """What serving reads from the finished tiny pipeline (models, data, reports, params) in a private dir."""
    dest = tmp_path_factory.mktemp("serving")
    for rel in ("models/base", "models/deploy", "data/raw", "reports"):
        shutil.copytree(pipeline_run.root / rel, dest / rel)
    shutil.copy2(pipeline_run.root / "params.yaml", dest / "params.yaml")
    return Project(dest, pipeline_run.env)
