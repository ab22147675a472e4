"""Resume state on the DVC remote: a manifest written by someone else places no file outside .ptune/state/<stage>/,
and a push of other params keeps the run it replaces.

Whoever can write to the remote can write its manifests. Each attack below plants a manifest and the file it names
on a real directory remote (as `dvc remote add` makes it), where the unchecked pull would have fetched it, then
pulls through ptune's code with the real DVC filesystem underneath.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from ptune.errors import PtuneError
from ptune.remote import checkpoints
from ptune.state.resume import KEEP_RUNS_ENV

KEY = "0123456789abcdef"
PAYLOAD = b"import os; os.system('echo owned')\n"  # what a .pth line does at every Python start


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory, env):
    """A DVC project (no git needed) whose default remote is the directory `storage` beside it."""
    root = tmp_path_factory.mktemp("ckpt") / "project"
    root.mkdir()
    storage = root.parent / "storage"
    for cmd in (["dvc", "init", "--no-scm", "-q"], ["dvc", "remote", "add", "-d", "local", str(storage)]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=120)
    return root


@pytest.fixture
def project(dvc_project, monkeypatch):
    """The project, emptied of resume state and remote state, as the working directory."""
    import shutil

    for leftover in (dvc_project / ".ptune", dvc_project / ".venv", dvc_project.parent / "storage"):
        shutil.rmtree(leftover, ignore_errors=True)
    monkeypatch.chdir(dvc_project)
    monkeypatch.delenv(KEEP_RUNS_ENV, raising=False)
    return dvc_project


def _state_root(project: Path) -> Path:
    return project.parent / "storage" / "ptune-state"


def _files_outside(project: Path, stage: str) -> set[Path]:
    """Every file of the project and the temp dir around it, except the DVC internals, the remote and the stage's
    own resume folder: where an attack would land."""
    root = project.parent
    skip = (project / ".dvc", root / "storage", project / ".ptune" / "state" / stage)
    return {p for p in root.rglob("*") if p.is_file() and not any(p.is_relative_to(s) for s in skip)}


def _plant(project: Path, manifest, stage: str = "train", files: dict | None = None) -> Path:
    """Write `manifest` (an object, or raw bytes) as the stage's manifest, and each `files` {key/name: bytes}
    where an unchecked pull would read it: `<remote>/ptune-state/<stage>/<key>/<name>`, `..` and all."""
    base = _state_root(project) / stage
    for rel, data in (files or {}).items():
        source = Path(os.path.normpath(os.path.join(base, rel)))
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(data)
    base.mkdir(parents=True, exist_ok=True)
    path = base / "manifest.json"
    path.write_bytes(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
    return path


def _entry(data: bytes) -> dict:
    return {"md5": hashlib.md5(data).hexdigest(), "size": len(data)}


def _attack(key: str, name: str, stage: str = "train") -> tuple[dict, dict]:
    return {"stage": stage, "key": key, "files": {name: _entry(PAYLOAD)}}, {f"{key}/{name}": PAYLOAD}


SITE = "../../../../.venv/lib/python3.11/site-packages/evil.pth"  # from .ptune/state/train/<key>/ to the venv
ATTACKS = {
    "key climbs out": _attack("../../..", "evil.pth"),
    "key climbs out, name plain": _attack("../../../.venv/lib/python3.11/site-packages", "evil.pth"),
    "name climbs into site-packages": _attack(KEY, SITE),
    "name with a backslash": _attack(KEY, "..\\..\\evil.pth"),
    "hidden name": _attack(KEY, ".evil.pth"),
    # No file can be planted under that name; unchecked, the pull ended in a ValueError traceback.
    "name with NUL": ({"key": KEY, "files": {"evil.pth\x00.safetensors": _entry(PAYLOAD)}}, {}),
    "key with a slash": _attack("0123456789abcdef/../../..", "evil.pth"),
    "key in capitals": _attack(KEY.upper(), "evil.pth"),
    "stage field names another stage": _attack(KEY, "evil.pth", stage="../../.venv"),
}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=list(ATTACKS))
def test_a_hostile_manifest_writes_nothing_outside_the_stage_folder(project, attack):
    manifest, files = attack
    (project / ".venv/lib/python3.11/site-packages").mkdir(parents=True)
    where = _plant(project, manifest, files=files)
    before = _files_outside(project, "train")
    with pytest.raises(PtuneError) as refused:
        checkpoints.pull()
    assert str(where) in str(refused.value) and "not a ptune resume-state manifest" in str(refused.value)
    assert _files_outside(project, "train") == before
    assert not any(p.is_file() for p in (project / ".ptune").rglob("*")), "a refused manifest fetched something"


def test_an_absolute_name_is_refused(project, tmp_path):
    target = tmp_path / "outside" / "evil.pth"  # an unchecked pull would download onto this very path
    target.parent.mkdir()
    target.write_bytes(PAYLOAD)
    _plant(project, {"key": KEY, "files": {str(target): _entry(PAYLOAD)}})
    with pytest.raises(PtuneError, match="not a plain file name"):
        checkpoints.pull(["train"])
    assert [p.name for p in target.parent.iterdir()] == ["evil.pth"]  # no temp file beside it either
    assert not (project / ".ptune").exists()


def test_a_run_folder_that_is_a_symlink_is_not_written_through(project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (project / ".ptune/state/train").mkdir(parents=True)
    (project / ".ptune/state/train" / KEY).symlink_to(elsewhere)
    _plant(
        project,
        {"key": KEY, "files": {"checkpoint-00000004.safetensors": _entry(PAYLOAD)}},
        files={f"{KEY}/checkpoint-00000004.safetensors": PAYLOAD},
    )
    with pytest.raises(PtuneError, match="outside"):
        checkpoints.pull(["train"])
    assert not any(elsewhere.iterdir())


def test_only_stages_whose_state_travels_are_pulled(project, caplog):
    # A folder for another stage (fetch_weights resumes a Git clone from its state) or none at all.
    for stage in ("fetch_weights", "site-packages"):
        _plant(project, {"key": KEY, "files": {"x.pth": _entry(PAYLOAD)}}, stage=stage, files={f"{KEY}/x.pth": PAYLOAD})
    assert checkpoints.pull() == {}
    assert not (project / ".ptune").exists()
    assert "ignored" in caplog.text and "fetch_weights" in caplog.text
    for stage in ("fetch_weights", "../../x"):
        with pytest.raises(PtuneError, match="not a stage whose resume state travels"):
            checkpoints.pull([stage])


MALFORMED = {
    "not JSON": b"{'key': 1",
    "not UTF-8": b"\xff\xfe{}",
    "a list": [],
    "no key": {"files": {}},
    "key a number": {"key": 1234567890123456, "files": {}},
    "files a list": {"key": KEY, "files": ["checkpoint-00000004.safetensors"]},
    "file entry a string": {"key": KEY, "files": {"a.safetensors": "d41d8cd98f00b204e9800998ecf8427e"}},
    "md5 a number": {"key": KEY, "files": {"a.safetensors": {"md5": 5, "size": 0}}},
    "size a string": {"key": KEY, "files": {"a.safetensors": {"md5": "d41d8cd98f00b204e9800998ecf8427e", "size": "0"}}},
    "size negative": {"key": KEY, "files": {"a.safetensors": {"md5": "d41d8cd98f00b204e9800998ecf8427e", "size": -1}}},
    "older not a list": {"key": KEY, "files": {}, "older": {"key": KEY}},
    "older run hostile": {"key": KEY, "files": {}, "older": [{"key": "../..", "files": {}}]},
    "a key twice": {"key": KEY, "files": {}, "older": [{"key": KEY, "files": {}}]},
    "too large": b"{" + b" " * (2 << 20) + b"}",
}


@pytest.mark.parametrize("manifest", MALFORMED.values(), ids=list(MALFORMED))
def test_a_malformed_manifest_is_named_not_a_traceback(project, manifest):
    where = _plant(project, manifest)
    with pytest.raises(PtuneError) as refused:
        checkpoints.pull(["train"])
    assert str(where) in str(refused.value)
    assert not (project / ".ptune").exists()


def test_the_cli_names_the_manifest_and_prints_no_traceback(project, env):
    manifest, files = ATTACKS["name climbs into site-packages"]
    where = _plant(project, manifest, files=files)
    proc = subprocess.run(
        ["ptune", "checkpoint", "pull"], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(where) in proc.stderr and "not a plain file name" in proc.stderr
    # A push from the instance that holds the real state replaces the manifest, and what it named goes.
    run = project / ".ptune/state/train" / KEY
    run.mkdir(parents=True)
    (run / "checkpoint-00000004.safetensors").write_bytes(b"real progress")
    checkpoints.push()
    pushed = _state_root(project) / "train"
    assert sorted(str(p.relative_to(pushed)) for p in pushed.rglob("*") if p.is_file()) == [
        f"{KEY}/checkpoint-00000004.safetensors",
        "manifest.json",
    ]


def _run(project: Path, key: str, age_s: int, names: tuple[str, ...] = ("checkpoint-00000004.safetensors",)) -> Path:
    run = project / ".ptune/state/train" / key
    run.mkdir(parents=True)
    for name in names:
        (run / name).write_bytes(f"{key} {name}".encode())
    t = time.time() - age_s
    os.utime(run, (t, t))
    return run


def test_a_push_of_other_params_keeps_the_run_it_replaces(project, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    first, second, third = "1" * 16, "2" * 16, "3" * 16
    _run(project, first, age_s=300)
    checkpoints.push()
    _run(project, second, age_s=200)  # the params changed; the first run is set aside here, and must be there too
    checkpoints.push()
    manifest = json.loads((_state_root(project) / "train/manifest.json").read_text())
    assert manifest["key"] == second and [r["key"] for r in manifest["older"]] == [first]
    assert (_state_root(project) / "train" / first / "checkpoint-00000004.safetensors").is_file()
    kept = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(kept) == 1 and first in kept[0] and "kept as an older run" in kept[0]

    # A fresh instance gets both back, the newest as the newest folder (the one a push sends, a stage resumes).
    import shutil

    shutil.rmtree(project / ".ptune")
    checkpoints.pull()
    assert checkpoints.local_states(["train"])["train"].name == second
    assert (project / ".ptune/state/train" / first / "checkpoint-00000004.safetensors").read_bytes() == (
        f"{first} checkpoint-00000004.safetensors".encode()
    )

    # A third run: PTUNE_KEEP_RUNS=2 keeps two, and the one it deletes is named.
    caplog.clear()
    _run(project, third, age_s=-60)  # newer than the pulled folders, whatever the clock's resolution
    checkpoints.push()
    manifest = json.loads((_state_root(project) / "train/manifest.json").read_text())
    assert [manifest["key"]] + [r["key"] for r in manifest["older"]] == [third, second]
    assert not (_state_root(project) / "train" / first).exists()
    pruned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "deleting" in r.getMessage()]
    assert len(pruned) == 1 and first in pruned[0] and KEEP_RUNS_ENV in pruned[0]

    monkeypatch.setenv(KEEP_RUNS_ENV, "1")  # one run only, as before: the next push keeps its own alone
    checkpoints.push()
    assert not (_state_root(project) / "train" / second).exists()
