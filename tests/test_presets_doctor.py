"""Presets (`ptune preset use NAME`) and `ptune doctor`, as a user runs them in a finished project."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO, STAGES
from ptune import config

PRESETS = sorted((REPO / "presets").glob("*.yaml"))


def test_there_are_presets_for_glm4_and_a_t4():
    names = [p.stem for p in PRESETS]
    assert "glm4-9b-chat" in names and any("t4" in n for n in names)


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_each_preset_is_a_complete_valid_params_file_with_a_header(path):
    params = config.load(path)  # the schema: every key present, nothing unknown, values in range
    assert params.fetch_weights.source != "embedded" and len(params.fetch_weights.revision) == 40
    assert params.hardware.gpu_memory_gib > 0 and params.hardware.model_gib > 0
    header = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "Hardware:" in text and "Expected" in text and "estimate" in text


def test_preset_use_then_dvc_status_shows_the_stages_that_rerun(ran_project):
    p = ran_project
    assert json.loads(p.run("dvc", "status", "--json").stdout) == {}
    out = p.run("ptune", "preset", "use", "glm4-9b-chat").stdout
    assert "params.yaml is now presets/glm4-9b-chat.yaml" in out
    assert (p.root / "params.yaml").read_bytes() == (REPO / "presets" / "glm4-9b-chat.yaml").read_bytes()
    status = json.loads(p.run("dvc", "status", "--json").stdout)
    # A new model and data change every stage's params; nothing has run yet.
    assert sorted(status) == sorted(STAGES)
    changed = status["fetch_weights"][0]["changed deps"]["params.yaml"]
    assert changed == {"fetch_weights": "modified"}
    assert p.executed() == []


def test_preset_use_refuses_to_overwrite_uncommitted_edits(ran_project):
    p = ran_project
    p.set_param("train.max_steps", 7)
    edited = (p.root / "params.yaml").read_bytes()
    proc = p.run("ptune", "preset", "use", "glm4-9b-chat", check=False)
    assert proc.returncode == 2 and "params.yaml: not replaced, it has uncommitted edits" in proc.stderr
    assert (p.root / "params.yaml").read_bytes() == edited
    p.run("ptune", "preset", "use", "glm4-9b-chat", "--force")
    assert yaml.safe_load((p.root / "params.yaml").read_text())["train"]["max_steps"] == 3000


def test_preset_list_and_an_unknown_name(ran_project):
    listing = ran_project.run("ptune", "preset", "list").stdout
    assert "glm4-9b-chat" in listing and "GLM-4-9B-Chat" in listing
    proc = ran_project.run("ptune", "preset", "use", "chatglm-13b", check=False)
    assert proc.returncode == 2 and "no preset 'chatglm-13b'" in proc.stderr and "glm4-9b-chat" in proc.stderr


def test_doctor_reports_each_check_and_the_remote_on_the_workspace_disk(ran_project):
    proc = ran_project.run("ptune", "doctor", check=False)
    out = proc.stdout
    for topic in ("disk:", "gpu:", "stack:", "git-lfs:", "dvc remote:"):
        assert topic in out, out
    assert "ok       gpu: none; this run needs none" in out
    assert "PROBLEM  dvc remote: local" in out and "same disk as the workspace" in out
    assert "what to do: use storage outside the instance" in out
    assert proc.returncode == 1 and out.rstrip().endswith("1 problem(s)")


def test_doctor_checks_the_gpu_and_disk_a_preset_needs(ran_project):
    p = ran_project
    p.run("ptune", "preset", "use", "glm4-9b-chat")
    out = p.run("ptune", "doctor", check=False).stdout
    if "gpu: none" in out or "no CUDA GPU" in out:
        assert "PROBLEM  gpu: no CUDA GPU visible, and this run needs 40 GiB" in out
    assert "the hub cache 17.5" in out and "models/base (hard links into the hub cache) 0" in out


def test_doctor_without_a_remote_says_how_to_add_one(ran_project):
    p = ran_project
    p.run("dvc", "remote", "remove", "local")
    out = p.run("ptune", "doctor", check=False).stdout
    assert "PROBLEM  dvc remote: none usable" in out and "dvc remote add -d" in out
