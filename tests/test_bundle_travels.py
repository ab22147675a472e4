"""A deploy bundle that travels: its base named by origin and checked by sha256, its model card, `ptune publish`.

Real commands (`python -m ptune.bundle`, `ptune publish`) on the tiny pipeline's bundle, the real huggingface_hub
against the loopback stand-in of the hub (tests/support/hf_hub_stand_in.py), a temp HF_HOME: the machine's hub cache
and token are never touched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from support import hf_hub_stand_in

PROMPT = "类型#上衣*颜色#白色"
FAKE_TOKEN = "hf_ptuneFakeTokenForTests0123456789"


def _copy_bundle(serving_project, dest: Path) -> Path:
    bundle = dest / "deploy"
    shutil.copytree(serving_project.root / "models/deploy", bundle)
    return bundle


def _answer(serving_project, *args: str, cwd: Path | None = None, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "ptune.bundle", *args],
        cwd=cwd or serving_project.root,
        env=env or serving_project.env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_bundle_records_its_base_and_a_model_card_the_hub_classes_read(serving_project):
    from huggingface_hub import ModelCard

    root = serving_project.root
    manifest = json.loads((root / "models/deploy/bundle.json").read_text(encoding="utf-8"))
    assert manifest["format"] == 3 and "base_model" not in manifest
    base = manifest["base"]
    # The embedded base has no origin elsewhere: its local path, and every weight file's sha256.
    assert base["source"] == "embedded" and base["path"] == "models/base"
    from ptune.model.origin import sha256

    assert base["weights"] == {"model.safetensors": sha256(root / "models/base/model.safetensors")}
    assert base["config_sha256"] == manifest["base_config_sha256"]

    card = ModelCard.load(root / "models/deploy/README.md")  # huggingface_hub parses and checks the front matter
    data = card.data
    assert data.library_name == "ptune" and "p-tuning-v2" in data.tags
    metrics = json.loads((root / "reports/metrics.json").read_text(encoding="utf-8"))
    # model-index read back into huggingface_hub's EvalResults: the P-tuned scores, one per metric.
    got = {r.metric_name: r.metric_value for r in data.eval_results}
    assert got == {
        "BLEU-4": metrics["ptuned"]["bleu-4"],
        "ROUGE-1": metrics["ptuned"]["rouge-1"],
        "ROUGE-2": metrics["ptuned"]["rouge-2"],
        "ROUGE-L": metrics["ptuned"]["rouge-l"],
    }
    assert {r.task_type for r in data.eval_results} == {"text-generation"}
    assert "| base model alone |" in card.text and "| P-tuned (this prefix) |" in card.text
    assert "ptune serve api --bundle" in card.text and "pre_seq_len" in card.text


def test_a_format_2_bundle_is_refused_saying_how_to_rebuild_it(serving_project, tmp_path):
    bundle = _copy_bundle(serving_project, tmp_path)
    manifest = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    manifest["format"] = 2
    manifest["base_model"] = str(manifest.pop("base")["path"])
    (bundle / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    proc = _answer(serving_project, str(bundle), PROMPT)
    assert proc.returncode == 2, proc.stderr
    assert "bundle format 2" in proc.stderr and "dvc repro deploy" in proc.stderr and "Traceback" not in proc.stderr


def test_a_moved_bundle_serves_with_base_and_refuses_other_weights(serving_project, tmp_path):
    """On "another machine" (a folder with no models/base): refused naming --base; served with --base DIR; a base
    whose weights differ from the recorded sha256 is refused naming the file."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bundle = _copy_bundle(serving_project, elsewhere)
    lost = _answer(serving_project, str(bundle), PROMPT, cwd=elsewhere)
    assert lost.returncode == 2 and "--base DIR" in lost.stderr and "Traceback" not in lost.stderr, lost.stderr

    base = elsewhere / "my-base"
    shutil.copytree(serving_project.root / "models/base", base)
    here = _answer(serving_project, str(bundle), PROMPT, "--base", str(base), cwd=elsewhere)
    assert here.returncode == 0, here.stderr
    at_home = _answer(serving_project, "models/deploy", PROMPT)
    assert json.loads(here.stdout)["answer"] == json.loads(at_home.stdout)["answer"]

    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: same architecture, same config hash
    weights.write_bytes(bytes(data))
    other = _answer(serving_project, str(bundle), PROMPT, "--base", str(base), cwd=elsewhere)
    assert other.returncode == 2 and "model.safetensors: sha256" in other.stderr, other.stderr


def test_a_bundle_naming_a_hub_base_downloads_it_into_the_hub_cache(serving_project, tmp_path):
    """A bundle whose base is a Hugging Face repository at a commit: served where no models/base exists, the real
    snapshot_download fetches it from the (stand-in) hub into a temp HF_HOME, and its weights are checked."""
    repo, commit = "ptune-tests/tiny-glm", "c" * 40
    base_dir = serving_project.root / "models/base"
    files = {p.name: p.read_bytes() for p in base_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    files.pop("ptune_source.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bundle = _copy_bundle(serving_project, elsewhere)
    manifest = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    manifest["base"].update(source="hf_hub", repo=repo, revision=commit)
    del manifest["base"]["path"]
    (bundle / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    served, headers = hf_hub_stand_in.routes(repo, commit, files, repo_type="model")
    with hf_hub_stand_in.serve(served, headers) as hub:
        env = {
            **serving_project.env,
            "HF_ENDPOINT": hub.url(""),
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_TOKEN": FAKE_TOKEN,
        }
        env.pop("HF_HUB_OFFLINE", None)
        proc = _answer(serving_project, str(bundle), PROMPT, cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "answer" in json.loads(proc.stdout)
    assert any(p.endswith("/model.safetensors") for p, _ in hub.requests)
    assert list((tmp_path / "hf-home/hub").glob("models--ptune-tests--tiny-glm/snapshots/" + commit))


def test_publish_sends_the_bundle_without_base_weights_or_token(serving_project, tmp_path):
    """`ptune publish` against the stand-in of the hub's upload API: the repository created private, one commit with
    exactly bundle.json, README.md and the prefix; the token only in Authorization headers."""
    bundle = serving_project.root / "models/deploy"
    env = {**serving_project.env, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": FAKE_TOKEN}
    env.pop("HF_HUB_OFFLINE", None)
    with hf_hub_stand_in.UploadHub() as hub:
        env["HF_ENDPOINT"] = hub.origin
        proc = subprocess.run(
            [sys.executable, "-m", "ptune.cli", "publish", "--repo", "someone/ptune-adgen", "--private"],
            cwd=serving_project.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr
    assert hub.repos == [{"name": "ptune-adgen", "organization": "someone", "visibility": "private", "type": "model"}]
    assert len(hub.commits) == 1
    repo_id, header, files = hub.commits[0]
    assert repo_id == "someone/ptune-adgen"
    expected = ["README.md", "bundle.json"] + sorted(
        f"prefix/{p.name}" for p in (bundle / "prefix").iterdir() if not p.name.startswith(".")
    )
    assert sorted(files) == expected
    for name, data in files.items():
        assert data == (bundle / name).read_bytes(), name
    base_weights = (serving_project.root / "models/base/model.safetensors").read_bytes()
    assert all(data != base_weights for data in files.values())
    for path, request_headers, body in hub.requests:
        assert FAKE_TOKEN.encode() not in body, path
        assert request_headers.get("authorization") == f"Bearer {FAKE_TOKEN}", path
        assert not any(FAKE_TOKEN in v for k, v in request_headers.items() if k != "authorization"), path
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    assert not any(FAKE_TOKEN.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_publish_refuses_base_weights_and_a_token_in_the_bundle(serving_project, tmp_path):
    bundle = _copy_bundle(serving_project, tmp_path)
    shutil.copy2(serving_project.root / "models/base/model.safetensors", bundle / "prefix" / "extra.safetensors")
    env = {**serving_project.env, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": FAKE_TOKEN}

    def publish():
        return subprocess.run(
            [sys.executable, "-m", "ptune.cli", "publish", "--repo", "x/y", "--bundle", str(bundle), "--dry-run"],
            cwd=serving_project.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    proc = publish()
    assert proc.returncode == 2 and "base model's weights" in proc.stderr, proc.stderr
    (bundle / "prefix" / "extra.safetensors").unlink()
    card = bundle / "README.md"
    card.write_text(card.read_text(encoding="utf-8") + f"\ntoken: {FAKE_TOKEN}\n", encoding="utf-8")
    proc = publish()
    assert proc.returncode == 2 and "contains the hub token" in proc.stderr, proc.stderr
    assert FAKE_TOKEN not in proc.stderr
