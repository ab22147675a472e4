"""Code is an input: each stage declared once (pipeline/declared.py), dvc.yaml written from it with the code each
stage runs as deps (pipeline/code.py), each stage handed only the params it declares, and the project's own code run.

What each front end is expected to say after a code edit: `dvc status` names the stages whose own deps changed (a
downstream stage changes only once its inputs do, after a rerun); `snakemake -n` names every job downstream of them
(its inputs are older than the edited file or than outputs it would rewrite).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from ptune import config
from ptune.pipeline import code, dvc_yaml
from ptune.pipeline.declared import ALL, BY_NAME, NAMES
from ptune.remote import pods

from conftest import REPO, STAGES, TINY_PARAMS, Project

PACKAGE = "workflow/ptune/"

# The package's files that no stage runs, each a decision: a new module lands here or in a stage's code.
NOT_RUN_BY_ANY_STAGE = {
    # The command line: parsing, and the commands that are not stages.
    "cli.py",
    "doctor.py",
    "presets.py",
    "bundle/__main__.py",
    "bundle/command.py",
    "bundle/publish.py",
    "reporting/compare.py",
    "remote/configure.py",
    "remote/credentials.py",
    "remote/dvc_lock.py",
    "remote/pods.py",
    "remote/status.py",
    "remote/sync.py",
    # The declarations and dvc.yaml's writer: what changes a result is in dvc.yaml, which DVC compares itself.
    "pipeline/__init__.py",
    "pipeline/code.py",
    "pipeline/declared.py",
    "pipeline/dvc_yaml.py",
    # Serving that deploy's check does not start: the web page and the terminal chat.
    "serve/chat.py",
    "serve/web.py",
}


def _stage_deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps") or []]


def test_committed_dvc_yaml_is_what_the_declarations_give():
    """CI fails here when a declaration or an import changed and `ptune pipeline write` was not run."""
    assert dvc_yaml.check() is None, dvc_yaml.check()


def test_check_names_the_difference_and_the_command_that_fixes_it(tmp_path):
    text = (REPO / "dvc.yaml").read_text(encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text(text.replace("      - workflow/ptune/stages/train.py\n", ""), encoding="utf-8")
    problem = dvc_yaml.check(tmp_path)
    assert "ptune pipeline write" in problem and "+      - workflow/ptune/stages/train.py" in problem
    dvc_yaml.write(tmp_path)
    assert dvc_yaml.check(tmp_path) is None and not list(tmp_path.glob(".dvc.yaml.tmp-*"))


def test_dvc_yaml_says_what_each_stage_declares():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert tuple(stages) == NAMES == STAGES
    for name, stage in stages.items():
        declared = BY_NAME[name]
        assert stage["cmd"] == f"ptune {name}" and stage["desc"] == declared.help
        assert _stage_deps(stage) == [*map(str, declared.reads), *code.stage_files(name)], name
        assert stage["outs"] == [str(p) for p in declared.writes], name
        assert stage.get("metrics", []) == [str(p) for p in declared.metrics], name
        assert [p for entry in stage.get("plots", []) for p in entry] == [str(p) for p in declared.plots], name
        params = [{"params.yaml": None}] if ALL in declared.params else list(declared.params)
        assert stage["params"] == params, name
        assert stage["meta"]["resources"] == declared.resources


def test_code_deps_are_files_of_the_package_never_folders():
    for name in NAMES:
        files = code.stage_files(name)
        assert files == sorted(set(files))
        for rel in files:
            assert rel.startswith(PACKAGE) and "__pycache__" not in rel and (REPO / rel).is_file(), rel
        assert f"{PACKAGE}stages/{name}.py" in files and f"{PACKAGE}stages/runner.py" in files


def test_what_no_stage_runs_is_listed():
    assert set(code.not_stage_code()) == NOT_RUN_BY_ANY_STAGE


@pytest.mark.parametrize(
    "rel, stages",
    [
        ("stages/evaluate.py", {"evaluate"}),
        ("model/generation.py", {"evaluate", "deploy"}),  # deploy's server generates too
        ("stages/train.py", {"train"}),
        ("compute/training.py", {"train"}),
        ("data/prompts.py", {"preprocess", "evaluate", "deploy"}),  # every stage that builds a prompt
        ("model/embedded.py", {"fetch_weights"}),
        ("serve/api.py", {"deploy"}),  # deploy's check serves the bundle
        ("stages/environment.py", {"preprocess", "train", "evaluate", "deploy"}),  # the model stages only
        ("reporting/templates/report.md.j2", {"report"}),
        ("doctor.py", set()),
        ("serve/web.py", set()),
        ("cli.py", set()),
        ("pipeline/declared.py", set()),
    ],
)
def test_a_file_is_the_code_of_exactly_the_stages_that_run_it(rel, stages):
    assert {name for name in NAMES if PACKAGE + rel in code.stage_files(name)} == stages


def test_a_stage_is_handed_only_the_params_it_declares(monkeypatch):
    deploy = config.load(TINY_PARAMS, stage="deploy")
    assert deploy.deploy.smoke_prompt and deploy.evaluate.quantization == "none"
    assert deploy.fetch_weights.trust_remote_code is False and deploy.fetch_data.source == "embedded"
    with pytest.raises(config.UndeclaredParam, match=r"stage deploy read params evaluate\.batch_size.*declared\.py"):
        _ = deploy.evaluate.batch_size
    with pytest.raises(config.UndeclaredParam, match=r"train\.max_steps"):
        _ = deploy.train.max_steps
    assert set(deploy.raw) == {"deploy", "preprocess", "evaluate", "fetch_weights", "fetch_data", "report"}
    assert set(deploy.raw["evaluate"]) == {"quantization"} and "train" not in deploy.raw
    # The report shows every param; a process a stage starts is in its scope through PTUNE_STAGE.
    assert config.load(TINY_PARAMS, stage="report").train.max_steps > 0
    monkeypatch.setenv(config.STAGE_ENV, "train")
    with pytest.raises(config.UndeclaredParam, match="evaluate.seed"):
        _ = config.load(TINY_PARAMS).evaluate.seed
    with pytest.raises(config.UndeclaredParam, match="fetch_weights.trust_remote_code"):
        config.check_declared("fetch_weights.trust_remote_code")
    config.check_declared("train.seed")


def test_committed_dvc_lock_records_this_code():
    """The committed dvc.lock is the embedded default's run: whoever changes a stage's code refreshes it in the same
    commit (`dvc repro` on the default params, or `dvc commit -f STAGE` for a change that cannot change results)."""
    stages = yaml.safe_load((REPO / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    stale = []
    for name in NAMES:
        locked = {d["path"]: d["md5"] for d in stages[name]["deps"] if d["path"].startswith(PACKAGE)}
        assert set(locked) == set(code.stage_files(name)), f"dvc.lock's {name} lists other code than dvc.yaml"
        for path, md5 in locked.items():
            if hashlib.md5((REPO / path).read_bytes()).hexdigest() != md5:
                stale.append(f"{name}: {path}")
    assert not stale, "dvc.lock records other code; run `dvc repro` and commit dvc.lock:\n" + "\n".join(stale)


def test_run_key_of_pods_sees_the_code(tmp_path):
    for rel in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / rel, tmp_path / rel)
    shutil.copytree(REPO / "workflow", tmp_path / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "docs").mkdir()
    before = pods.run_key(tmp_path)
    (tmp_path / "docs" / "notes.md").write_text("not code\n", encoding="utf-8")
    assert pods.run_key(tmp_path) == before
    with open(tmp_path / "workflow/ptune/stages/train.py", "a", encoding="utf-8") as f:
        f.write("# edited\n")
    assert pods.run_key(tmp_path) != before


def _cli_option_modules() -> set[str]:
    """What cli.py imports at its top, with what those import: every command's options, built by every `ptune`
    process to parse its command line, a stage's too."""
    tree = ast.parse((REPO / PACKAGE / "cli.py").read_text(encoding="utf-8"))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            top |= {f"ptune.{node.module}", *(f"ptune.{node.module}.{a.name}" for a in node.names)}
    seen, todo = set(), [m for m in top if m in code.files()]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(code.graph()[m])
    return {code.files()[m].relative_to(REPO).as_posix() for m in seen} | {
        f"{PACKAGE}{p}/__init__.py" for p in ("serve", "pipeline")
    }


def test_each_stage_process_runs_its_declared_code_and_the_projects_own(pipeline_run):
    """Every process of the session's run recorded the ptune modules it imported (tests/support/import_trace): a
    stage's processes, deploy's server and its scheduler included, load only the stage's code deps (plus the command
    line's parsing and the declarations, NOT_STAGE_CODE), all from the project's own copy of the package."""
    root = pipeline_run.root.resolve()
    processes = defaultdict(list)
    for line in pipeline_run.import_trace.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        processes[record["process"]].append(record)
    allowed = {f"{PACKAGE}cli.py", *_cli_option_modules()}
    seen = defaultdict(int)
    for records in processes.values():
        stages = {r["stage"] for r in records} - {None}
        if not stages:
            continue  # `ptune STAGE` before it re-executes on the project's code, or a process of DVC or Snakemake
        assert len(stages) == 1, stages
        stage = stages.pop()
        seen[stage] += 1
        files = {r["file"] for r in records}
        outside = sorted(f for f in files if not Path(f).resolve().is_relative_to(root))
        assert not outside, f"{stage} ran code from outside the project: {outside}"
        loaded = {Path(f).resolve().relative_to(root).as_posix() for f in files}
        extra = loaded - set(code.stage_files(stage)) - allowed
        assert not extra, f"{stage} ({records[-1]['argv'][:3]}) loaded modules that are not its code deps: {extra}"
    # One process per stage, and deploy's server and scheduler on top.
    assert set(seen) == set(NAMES) and seen["deploy"] >= 3, dict(seen)


def _changed(project: Project) -> set[str]:
    return set(json.loads(project.run("dvc", "status", "--json").stdout))


def _append(project: Project, rel: str, text: str = "\n# an edit\n") -> None:
    with open(project.root / PACKAGE / rel, "a", encoding="utf-8") as f:
        f.write(text)


def _snakemake_jobs(project: Project) -> set[str]:
    out = project.run("snakemake", "-n", "report").stdout
    return {line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith(("rule ", "localrule "))}


def test_a_code_edit_changes_exactly_the_stages_that_run_it(ran_project):
    p = ran_project
    expected = {
        "stages/evaluate.py": {"evaluate"},
        "model/generation.py": {"evaluate", "deploy"},
        "stages/train.py": {"train"},
        "data/prompts.py": {"preprocess", "evaluate", "deploy"},
        "doctor.py": set(),
        "serve/web.py": set(),
    }
    for rel, stages in expected.items():
        _append(p, rel)
        assert _changed(p) == stages, rel
        p.run("git", "checkout", "-q", "--", PACKAGE + rel)
    # A help text is dvc.yaml's desc, no part of a stage's hash: nothing reruns.
    declared = p.root / PACKAGE / "pipeline/declared.py"
    declared.write_text(declared.read_text(encoding="utf-8").replace("score BLEU-4", "score BLEU"), encoding="utf-8")
    p.run("ptune", "pipeline", "write")
    assert "score BLEU / ROUGE" in (p.root / "dvc.yaml").read_text(encoding="utf-8")
    assert _changed(p) == set()


# Slow (40 s): the test above keeps which stages an edit changes; this one runs them, with both front ends.
@pytest.mark.slow
def test_after_a_code_edit_each_front_end_reruns_what_it_affects(ran_project):
    """Snakemake plans every job downstream; DVC reruns evaluate, then what its changed outputs feed, and never what
    comes before; then both see nothing to do."""
    p = ran_project
    _append(p, "stages/evaluate.py")
    assert _snakemake_jobs(p) == {"evaluate", "deploy", "report"}
    p.run("dvc", "repro")
    executed = p.executed()
    assert executed[0] == "evaluate" and set(executed) <= {"evaluate", "deploy", "report"}, executed
    assert _changed(p) == set()
    p.clear_log()
    p.run("snakemake", "--cores", "1", "report")
    assert p.executed() == []


def test_dvc_commit_accepts_a_code_change_without_recomputing(ran_project):
    """A change known to leave the results as they are (a comment, a log line) on a run that took hours: `dvc commit
    -f STAGE` records the new code's hashes in dvc.lock; neither front end recomputes anything."""
    p = ran_project
    _append(p, "stages/train.py", "\n# a comment: the results stay as they are\n")
    assert _changed(p) == {"train"}
    p.run("dvc", "commit", "-f", "train")
    assert _changed(p) == set()
    p.run("dvc", "repro")
    p.run("snakemake", "--cores", "1", "report")
    assert p.executed() == []


def test_status_names_a_stage_that_ran_with_other_libraries(ran_project):
    """DVC does not hash the libraries: each stage records the versions it ran with, and `ptune status` compares."""
    p = ran_project
    timing = p.root / "reports/timings/train.json"
    record = json.loads(timing.read_text(encoding="utf-8"))
    assert set(record["versions"]) == {"python", "torch", "transformers", "tokenizers"}
    assert json.loads(p.run("ptune", "status", "--json").stdout)["stages"]["train"]["libraries"] == []
    record["versions"]["torch"] = "1.0.0"
    timing.write_text(json.dumps(record), encoding="utf-8")
    status = json.loads(p.run("ptune", "status", "--json").stdout)["stages"]
    assert status["train"]["libraries"] == [f"torch 1.0.0 (now {_torch()})"]
    assert status["evaluate"]["libraries"] == []
    out = p.run("ptune", "status").stdout
    assert "train ran with torch 1.0.0" in out and "dvc repro -f -s train" in out


def _torch() -> str:
    from importlib import metadata

    return metadata.version("torch")


def test_a_stage_that_reads_an_undeclared_param_fails_naming_it(ran_project):
    """Deploy's server reads fetch_weights.trust_remote_code (the consent to a chatglm base's code): with it left out
    of the declaration, the stage fails naming the key and where to declare it, in the server's process too."""
    p = ran_project
    declared = p.root / PACKAGE / "pipeline/declared.py"
    text = declared.read_text(encoding="utf-8")
    assert text.count('            "fetch_weights.trust_remote_code",\n') == 1
    declared.write_text(text.replace('            "fetch_weights.trust_remote_code",\n', ""), encoding="utf-8")
    proc = p.run("ptune", "deploy", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "stage deploy read params fetch_weights.trust_remote_code" in out and "declared.py" in out, out[-3000:]


# Slow, like the other experiment tests' full runs; tests/test_code_deps.py's import trace already shows every stage
# process running the project's own copy of the package.
@pytest.mark.slow
def test_a_temporary_experiment_runs_the_code_dvc_hashed(ran_project, tmp_path):
    """`dvc exp run --temp` (and a queued experiment, the same executor) runs in a copy of the workspace under
    .dvc/tmp/exps: the stage runs that copy's code, the code DVC hashed, not the checkout ptune is installed from."""
    p = ran_project
    marker = tmp_path / "ran-from"
    report = p.root / PACKAGE / "stages/report.py"
    text = report.read_text(encoding="utf-8")
    edit = f"\n\nimport pathlib as _pathlib\n\n_pathlib.Path({str(marker)!r}).write_text(__file__)\n"
    report.write_text(text + edit, encoding="utf-8")
    p.run("dvc", "exp", "run", "--temp", "report")
    ran_from = Path(marker.read_text(encoding="utf-8")).resolve()
    assert ran_from.is_relative_to((p.root / ".dvc/tmp/exps").resolve()), ran_from
    assert ran_from.parts[-4:] == ("workflow", "ptune", "stages", "report.py")


def test_a_fresh_clone_on_a_shared_cache_with_old_times_recomputes_nothing(ran_project):
    """A team's pre-filled cache, linked into a fresh clone: the outputs keep the cache files' old times, older than
    the clone's code. Snakemake runs its jobs (its inputs look newer), and DVC, the one cache, recomputes nothing."""
    a = ran_project
    a.run("git", "add", "-A")
    a.run("git", "commit", "-q", "-m", "pipeline run")
    cache = a.root / ".dvc" / "cache"
    old = 1_577_836_800  # 2020-01-01
    for path in cache.rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    dest = a.root.parent / "on-shared-cache"
    a.run("git", "clone", "-q", str(a.root), str(dest))
    b = Project(dest, a.env)
    b.run("dvc", "cache", "dir", "--local", str(cache))
    b.run("dvc", "config", "--local", "cache.type", "symlink")
    b.run("dvc", "pull")
    assert (dest / "models/ptuning/prefix.safetensors").is_symlink()
    b.run("snakemake", "--cores", "1", "report")
    assert b.executed() == []
    b.run("dvc", "repro")
    assert b.executed() == [] and _changed(b) == set()
