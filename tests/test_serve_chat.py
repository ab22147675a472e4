"""`ptune chat` in a pseudo-terminal, as a person types at it: ask, `clear`, `stop`, Ctrl-C."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pexpect
import psutil
import pytest

from support.prompt_seam import logged_prompts, preprocessed_prompts
from support.serving import SAMPLING_FLAGS, cases, reference_answer


def _spawn(project, *flags: str) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        ["-m", "ptune.cli", "chat", *flags],
        cwd=str(project.root),
        env=project.env,
        encoding="utf-8",
        timeout=120,
    )


def _ask(chat: pexpect.spawn, text: str) -> str:
    chat.sendline(text)
    chat.expect_exact("ptune: ")
    chat.expect_exact("\r\nYou: ")
    return chat.before.strip()


def test_chat_asks_clears_and_stops(serving_project, tmp_path):
    prompt, seed, expected = cases(serving_project.root, 1)[0]
    chat = _spawn(serving_project, *SAMPLING_FLAGS, "--seed", str(seed), "--log-prompts")
    chat.logfile_read = screen = io.StringIO()
    try:
        chat.expect_exact("P-tuned, prefix of 4 tokens")
        chat.expect_exact("You: ")
        assert _ask(chat, prompt) == expected
        # One reader: the scheduler is a thread here, not a process as under `ptune serve` (test_serve_api).
        assert not [c for c in psutil.Process(chat.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        second = _ask(chat, prompt)  # with the first round as history
        assert second == reference_answer(serving_project.root, prompt, seed, history=((prompt, expected),))
        _ask(chat, prompt)  # a third turn, after two rounds
        # The model read each turn as `ptune preprocess` writes a training example with that history.
        trained = preprocessed_prompts(
            serving_project.root,
            tmp_path / "preprocess",
            serving_project.env,
            [(prompt, None), (prompt, [(prompt, expected)]), (prompt, [(prompt, expected), (prompt, second)])],
        )
        assert logged_prompts(screen.getvalue()) == trained
        chat.sendline("clear")
        chat.expect_exact("(history cleared)")
        chat.expect_exact("You: ")
        assert _ask(chat, prompt) == expected
        chat.sendline("stop")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0


@pytest.mark.parametrize(
    "source,shown",
    [(["--base-only"], "base model alone"), (["--model", "models/base"], "model `models/base` (no prefix)")],
)
def test_chat_on_the_base_model_alone_and_ctrl_c_quits(serving_project, source, shown):
    # The bundle's base without its prefix, or the base model directory with params.yaml's template.
    prompt, seed, expected = cases(serving_project.root, 1, base_only=True)[0]
    chat = _spawn(serving_project, *source, *SAMPLING_FLAGS, "--seed", str(seed))
    try:
        chat.expect_exact(shown)
        chat.expect_exact("You: ")
        assert _ask(chat, prompt) == expected
        chat.sendintr()  # Ctrl-C at the prompt: a clean exit, no traceback
        chat.expect(pexpect.EOF)
        assert "Traceback" not in chat.before
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0


def test_a_bundle_of_the_old_format_is_refused_saying_how_to_rebuild_it(serving_project, tmp_path):
    """A format-1 bundle did not record the prompt format: it is never served with another prompt."""
    import json
    import shutil

    old = tmp_path / "deploy"
    shutil.copytree(serving_project.root / "models/deploy", old)
    manifest = json.loads((old / "bundle.json").read_text(encoding="utf-8"))
    manifest["format"] = 1
    manifest["prompt_template"] = manifest.pop("prompt")["template"]
    (old / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    for cmd in (["-m", "ptune.cli", "chat", "--bundle", str(old)], ["-m", "ptune.bundle", str(old), "你好"]):
        proc = serving_project.run(sys.executable, *cmd, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "bundle format 1" in proc.stderr and "dvc repro deploy" in proc.stderr
        assert "Traceback" not in proc.stderr


def _forged_bundle(serving_project, tmp_path) -> tuple[Path, Path]:
    """A bundle whose chatglm base records trust_remote_code: true and ships a configuration_*.py that writes a
    marker when imported; returns (bundle, marker)."""
    marker = tmp_path / "pwned"
    forged = tmp_path / "forged"
    base = forged / "base"
    base.mkdir(parents=True)
    (base / "config.json").write_text(
        json.dumps({"model_type": "chatglm", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}), encoding="utf-8"
    )
    (base / "configuration_x.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\nclass XConfig(PretrainedConfig):\n    model_type = 'chatglm'\n",
        encoding="utf-8",
    )
    (base / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    record = {"backend": "chatglm", "trust_remote_code": True, "allow_pickle": False}
    (base / "ptune_source.json").write_text(json.dumps(record), encoding="utf-8")
    import torch
    from safetensors.torch import save_file

    (forged / "prefix").mkdir()
    save_file({"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 8)}, forged / "prefix/model.safetensors")
    manifest = json.loads((serving_project.root / "models/deploy/bundle.json").read_text(encoding="utf-8"))
    manifest.update(backend="chatglm", prefix="prefix")
    manifest["base"] = {"source": "path", "backend": "chatglm", "path": str(base), "weights": {}}
    (forged / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    return forged, marker


def test_a_bundle_cannot_consent_to_its_own_code(serving_project, tmp_path):
    """A forged bundle whose base records trust_remote_code: true and ships a configuration_*.py: serving it runs
    none of that code without the user's --trust-remote-code (it used to, on the record's word); with the flag, it
    is the user's decision and the code runs."""
    from ptune.model import legacy_env

    legacy = legacy_env.venv_dir() / "bin" / "python"
    if not legacy.is_file():
        pytest.skip(f"no legacy environment ({legacy}): `make legacy` creates it")
    forged, marker = _forged_bundle(serving_project, tmp_path)
    env = {**serving_project.env, legacy_env.PYTHON_VAR: str(legacy)}
    project = type(serving_project)(serving_project.root, env)
    for cmd in (
        ["-m", "ptune.cli", "chat", "--bundle", str(forged)],
        ["-m", "ptune.cli", "serve", "api", "--port", "0", "--bundle", str(forged)],
        ["-m", "ptune.bundle", str(forged), "你好"],
    ):
        proc = project.run(sys.executable, *cmd, check=False, timeout=300)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "--trust-remote-code" in proc.stderr and "configuration_x.py" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not marker.exists(), cmd
    # The user's flag is consent: the code runs (and this forged model then fails to load, as it must).
    project.run(sys.executable, "-m", "ptune.cli", "chat", "--bundle", str(forged), "--trust-remote-code", check=False)
    assert marker.read_text() == "ran"


def test_a_bundle_cannot_make_ptune_build_the_legacy_environment(serving_project, tmp_path):
    """The consent check comes before the switch to ChatGLM-6B's environment, which would create it (a pip install)
    on a machine that has none: a forged bundle is refused with nothing built and none of its code run."""
    from ptune.model import legacy_env

    forged, marker = _forged_bundle(serving_project, tmp_path)
    nowhere = tmp_path / "no-legacy-env"
    env = {k: v for k, v in serving_project.env.items() if k != legacy_env.PYTHON_VAR}
    project = type(serving_project)(serving_project.root, {**env, legacy_env.VENV_VAR: str(nowhere)})
    proc = project.run(sys.executable, "-m", "ptune.cli", "chat", "--bundle", str(forged), check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--trust-remote-code" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not nowhere.exists() and not marker.exists()
