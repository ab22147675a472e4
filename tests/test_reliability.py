"""Reliability: bad input is named by every front end, a full disk leaves nothing behind, two runs at once never
corrupt each other, and corrupted outputs are detected and repaired. All with real processes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

PREFIX = "models/ptuning/prefix.safetensors"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_params(project, old: str, new: str) -> None:
    params = project.root / "params.yaml"
    text = params.read_text(encoding="utf-8")
    assert old in text, old
    params.write_text(text.replace(old, new, 1), encoding="utf-8")


# (what the user got wrong, the edit to params.yaml, what every front end's message must name)
BAD_PARAMS = [
    ("out of range", ("pre_seq_len: 4", "pre_seq_len: 0"), "pre_seq_len"),
    ("negative", ("learning_rate: 0.02", "learning_rate: -1"), "learning_rate"),
    ("wrong type", ("max_steps: 6", "max_steps: six"), "max_steps"),
    ("unknown key", ("max_steps: 6", "max_steps: 6\n  max_stepz: 6"), "max_stepz"),
    ("YAML syntax", ("max_steps: 6", "max_steps: [6"), "params.yaml"),
]


@pytest.mark.parametrize("what,edit,named", BAD_PARAMS, ids=[b[0] for b in BAD_PARAMS])
def test_bad_params_are_named_by_ptune_snakemake_and_dvc_and_lose_nothing(ran_project, what, edit, named):
    p = ran_project
    before = _digest(p.root / PREFIX)
    _edit_params(p, *edit)
    for cmd in (("ptune", "validate"), ("ptune", "train"), ("snakemake", "--cores", "1", "report"), ("dvc", "repro")):
        proc = p.run(*cmd, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"{' '.join(cmd)} accepted {what}"
        assert named in out, f"{' '.join(cmd)} did not name {named!r}:\n{out[-2000:]}"
        if cmd[0] == "ptune":
            assert proc.returncode == 2 and "Traceback" not in out, out[-2000:]
    assert p.executed() == []  # refused before any stage started
    # DVC removes a stage's outputs before its command runs; they are in its cache, and nothing else changed.
    _edit_params(p, edit[1], edit[0])
    p.run("dvc", "checkout")
    assert _digest(p.root / PREFIX) == before
    assert "up to date" in p.run("dvc", "status").stdout


def test_limits_past_the_model_context_fail_naming_the_keys(ran_project):
    p = ran_project
    _edit_params(p, "max_source_length: 48", "max_source_length: 1000")  # the tiny model's context is 512
    proc = p.run("ptune", "preprocess", check=False)
    assert proc.returncode == 2 and "preprocess.max_source_length" in proc.stderr and "512" in proc.stderr
    _edit_params(p, "max_source_length: 1000", "max_source_length: 48")
    _edit_params(p, "pre_seq_len: 4", "pre_seq_len: 500")
    proc = p.run("ptune", "train", check=False)
    assert proc.returncode == 2 and "train.pre_seq_len" in proc.stderr and "512" in proc.stderr


def test_a_template_that_leaves_no_room_for_the_content_fails(ran_project):
    p = ran_project
    _edit_params(p, "max_source_length: 48", "max_source_length: 3")
    proc = p.run("ptune", "preprocess", check=False)
    assert proc.returncode == 2 and "prompt_template" in proc.stderr and "max_source_length" in proc.stderr


def test_a_tokenizer_from_another_model_is_refused(ran_project, tmp_path):
    p = ran_project
    model = tmp_path / "model"
    shutil.copytree(p.root / "models/base", model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 300  # the tokenizer has 600 tokens
    (model / "config.json").write_text(json.dumps(config))
    _edit_params(p, "  source: embedded\n  path: ''", f"  source: path\n  path: {model}")
    proc = p.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2 and "vocab_size 300" in proc.stderr and "tokenizer" in proc.stderr
    assert (p.root / "models/base/config.json").is_file()  # the previous base is untouched
    assert json.loads((p.root / "models/base/config.json").read_text())["vocab_size"] == 600


def test_a_model_folder_without_config_is_named(ran_project, tmp_path):
    p = ran_project
    (tmp_path / "empty").mkdir()
    _edit_params(p, "  source: embedded\n  path: ''", f"  source: path\n  path: {tmp_path / 'empty'}")
    proc = p.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2 and "config.json" in proc.stderr and str(tmp_path / "empty") in proc.stderr


def test_pickled_weights_need_the_opt_in_and_are_left_out_beside_safetensors(ran_project, tmp_path):
    p = ran_project
    model = tmp_path / "model"
    shutil.copytree(p.root / "models/base", model)
    (model / "ptune_source.json").unlink()
    (model / "pytorch_model.bin").write_bytes(b"a pickle would run code")  # never loaded: refused or left out
    (model / "training_args.bin").write_bytes(b"another")
    _edit_params(p, "  source: embedded\n  path: ''", f"  source: path\n  path: {model}")
    p.run("ptune", "fetch_weights")
    base = p.root / "models/base"
    assert not (base / "pytorch_model.bin").exists() and not (base / "training_args.bin").exists()
    assert (base / "model.safetensors").is_file()
    assert json.loads((base / "ptune_source.json").read_text())["allow_pickle"] is False
    (model / "model.safetensors").unlink()
    proc = p.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2 and "only as pickles (pytorch_model.bin, training_args.bin)" in proc.stderr
    assert "fetch_weights.allow_pickle: true" in proc.stderr
    assert (base / "model.safetensors").is_file()  # the previous base is untouched


@pytest.fixture
def small_disk(ran_project):
    """A 64 KiB tmpfs mounted over the project's models/ (root only; skipped where mounting is not allowed)."""
    target = ran_project.root / "models"
    shutil.rmtree(target)
    target.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({proc.stderr.strip() or 'mount failed'}); the disk-full "
            "test needs root or CAP_SYS_ADMIN"
        )
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_full_disk_fails_clearly_and_leaves_no_partial_output(ran_project, small_disk):
    proc = ran_project.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "disk is full" in proc.stderr and "models/base" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(small_disk.iterdir()) == [], "a partial output or temp dir was left on the full disk"


def _wait_for(predicate, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_two_runs_at_once_refuse_each_other_and_corrupt_nothing(ran_project):
    p = ran_project
    _edit_params(p, "max_steps: 6", "max_steps: 300")  # a training run long enough to overlap with
    first = subprocess.Popen(
        ["snakemake", "--cores", "1", "report"],
        cwd=p.root,
        env=p.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: "train" in p.executed() or first.poll() is not None)
        assert first.poll() is None, "the first run ended before the second could start"
        second = p.run("snakemake", "--cores", "1", "report", check=False, timeout=120)
        assert second.returncode != 0 and "lock" in (second.stdout + second.stderr).lower()
        dvc = p.run("dvc", "repro", "train", check=False, timeout=300)
        assert dvc.returncode != 0
        assert "already running" in dvc.stdout + dvc.stderr or "lock" in (dvc.stdout + dvc.stderr).lower()
        direct = p.run("ptune", "train", check=False, timeout=120)
        assert direct.returncode == 2 and "already running" in direct.stderr
    finally:
        out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out[-3000:]
    assert p.executed().count("train") == 1
    assert "up to date" in p.run("dvc", "status").stdout


def test_corrupted_outputs_are_detected_and_restored(ran_project):
    p = ran_project
    prefix = p.root / PREFIX
    good = _digest(prefix)
    data = bytearray(prefix.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last tensor byte: loads fine, wrong weights
    prefix.write_bytes(bytes(data))
    shard = next((p.root / "data/processed/train").glob("*.arrow"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    status = p.run("dvc", "status").stdout
    assert "models/ptuning" in status and "data/processed" in status, status
    p.run("dvc", "checkout", "--force")
    assert _digest(prefix) == good
    assert "up to date" in p.run("dvc", "status").stdout
    assert p.executed() == []  # restored from the cache, nothing recomputed


def test_no_secret_from_the_environment_reaches_any_file(pipeline_run):
    """The session run had tokens in its environment (conftest); none may appear in params, dvc.lock, logs,
    outputs, caches or reports."""
    token = pipeline_run.planted_secret.encode()
    leaks = [
        str(f.relative_to(pipeline_run.root))
        for f in pipeline_run.root.rglob("*")
        if f.is_file() and token in f.read_bytes()
    ]
    assert not leaks, f"a planted secret was written to {leaks}"
