"""Presets (`ptune preset use NAME`) and `ptune doctor`, as a user runs them in a finished project."""

from __future__ import annotations

import json

import pytest

from ptune import config

from conftest import REPO, STAGES

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
    listing = p.run("ptune", "preset", "list").stdout
    assert "glm4-9b-chat" in listing and "GLM-4-9B-Chat" in listing
    proc = p.run("ptune", "preset", "use", "chatglm-13b", check=False)
    assert proc.returncode == 2 and "no preset 'chatglm-13b'" in proc.stderr and "glm4-9b-chat" in proc.stderr

    # Uncommitted edits of params.yaml are never overwritten silently.
    committed = (p.root / "params.yaml").read_bytes()
    p.set_param("train.max_steps", 7)
    edited = (p.root / "params.yaml").read_bytes()
    proc = p.run("ptune", "preset", "use", "glm4-9b-chat", check=False)
    assert proc.returncode == 2 and "params.yaml: not replaced, it has uncommitted edits" in proc.stderr
    assert (p.root / "params.yaml").read_bytes() == edited
    (p.root / "params.yaml").write_bytes(committed)

    assert json.loads(p.run("dvc", "status", "--json").stdout) == {}
    out = p.run("ptune", "preset", "use", "glm4-9b-chat").stdout
    assert "params.yaml is now presets/glm4-9b-chat.yaml" in out
    assert (p.root / "params.yaml").read_bytes() == (REPO / "presets" / "glm4-9b-chat.yaml").read_bytes()
    status = json.loads(p.run("dvc", "status", "--json").stdout)
    # A new model and data change every stage's params; nothing has run yet.
    assert sorted(status) == sorted(STAGES)
    assert status["fetch_weights"][0]["changed deps"]["params.yaml"] == {"fetch_weights": "modified"}
    assert p.executed() == []


def test_doctor_reports_each_check_with_what_to_do(ran_project):
    p = ran_project
    proc = p.run("ptune", "doctor", check=False)
    out = proc.stdout
    for topic in ("disk:", "gpu:", "stack:", "git-lfs:", "dvc remote:"):
        assert topic in out, out
    assert "ok       gpu: none; this run needs none" in out
    # The default remote sits beside the clone: the same disk, gone with the instance.
    assert "PROBLEM  dvc remote: local" in out and "same disk as the workspace" in out
    assert "what to do: use storage outside the instance" in out and "ptune remote oss --bucket" in out
    # Not a PAI-DSW instance (no DSW_INSTANCE_ID): a general note, since the remote is on this disk.
    assert "ok       instance disk: a cloud notebook's disk goes with its instance" in out
    assert proc.returncode == 1 and out.rstrip().endswith("1 problem(s)")

    p.run("dvc", "remote", "remove", "local")
    p.run("ptune", "preset", "use", "glm4-9b-chat", "--force")
    out = p.run("ptune", "doctor", check=False).stdout
    assert "PROBLEM  dvc remote: none usable" in out and "dvc remote add -d" in out
    if "gpu: none" in out or "no CUDA GPU" in out:
        assert "PROBLEM  gpu: no CUDA GPU visible, and this run needs 40 GiB" in out
    assert "the hub cache 17.5" in out
