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

import pytest

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
    from ptune.bundle.origin import sha256

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


SUFFIXLESS = "model-00003-of-00003"  # the last shard of _sharded_base, renamed


def _sharded_base(serving_project, dest: Path) -> Path:
    """The tiny base in three shards and their index, as save_pretrained writes them (huggingface_hub's
    save_torch_state_dict, which it calls; loading the model class first would cost seconds), beside its config,
    tokenizer and ptune's record; the last shard renamed without its suffix, and the index pointed at it."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    source = serving_project.root / "models/base"
    dest.mkdir()
    save_torch_state_dict(load_file(source / "model.safetensors"), dest, max_shard_size="80KB")
    for path in source.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy2(path, dest / path.name)
    (dest / f"{SUFFIXLESS}.safetensors").rename(dest / SUFFIXLESS)
    _point_index(dest, f"{SUFFIXLESS}.safetensors", SUFFIXLESS)
    return dest


def _point_index(base: Path, shard: str, to: str) -> None:
    """Rewrite the index so that every tensor of `shard` is read from the file named `to`."""
    index = base / "model.safetensors.index.json"
    data = json.loads(index.read_text(encoding="utf-8"))
    data["weight_map"] = {k: to if v == shard else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data), encoding="utf-8")


def test_a_sharded_base_is_checked_by_every_file_its_index_names(serving_project, tmp_path):
    """A sharded base whose last shard has no weight suffix (transformers loads whatever the index names): the
    bundle records the index and that shard; a base where that shard is tampered with, or whose index names a file
    outside its folder, is refused by `python -m ptune.bundle --base DIR` before any weight is read."""
    from ptune.bundle import origin

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bundle = _copy_bundle(serving_project, elsewhere)
    base = _sharded_base(serving_project, elsewhere / "my-base")
    manifest = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    manifest["base"] = origin.record(base, manifest["base"]["config_sha256"])  # what `ptune deploy` records
    (bundle / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")

    shard = base / "model-00003-of-00003"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    shard.write_bytes(bytes(data))
    tampered = _answer(serving_project, str(bundle), PROMPT, "--base", str(base), "--allow-pickle", cwd=elsewhere)
    assert tampered.returncode == 2 and "model-00003-of-00003: sha256" in tampered.stderr, tampered.stderr

    outside = elsewhere / "outside.safetensors"
    shutil.copy2(base / "model-00001-of-00003.safetensors", outside)
    _point_index(base, "model-00001-of-00003.safetensors", "../outside.safetensors")
    escaped = _answer(serving_project, str(bundle), PROMPT, "--base", str(base), "--allow-pickle", cwd=elsewhere)
    assert escaped.returncode == 2 and "Traceback" not in escaped.stderr, escaped.stderr
    assert "model.safetensors.index.json: weight_map names the shard '../outside.safetensors'" in escaped.stderr
    assert "not a plain file name" in escaped.stderr
    assert sorted(manifest["base"]["weights"]) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003",
        "model.safetensors.index.json",
    ]


def test_fetch_weights_refuses_a_suffixless_shard_without_consent_to_pickles(serving_project, tmp_path):
    """fetch_weights' check of its fetched folder (trust.check_folder, as `ptune fetch_weights` calls it): a shard
    without the .safetensors suffix is unpickled by transformers, so it needs fetch_weights.allow_pickle, and it is
    not left out as a pickled copy would be (the model needs it)."""
    from ptune.errors import PtuneError
    from ptune.model import trust

    base = _sharded_base(serving_project, tmp_path / "fetched")
    with pytest.raises(PtuneError, match=r"shards without the .safetensors suffix \(model-00003-of-00003\)"):
        trust.check_folder(base, backend="transformers", trust_remote_code=False, allow_pickle=False, what="x")
    assert (base / "model-00003-of-00003").is_file()
    trust.check_folder(base, backend="transformers", trust_remote_code=False, allow_pickle=True, what="x")


@pytest.mark.slow
def test_a_sharded_base_with_a_suffixless_shard_serves_only_with_consent_to_pickles(serving_project, tmp_path):
    """transformers hands a shard not named *.safetensors to torch.load: such a base is served with --allow-pickle
    only; with it, the untouched sharded base answers as the original one does."""
    from ptune.bundle import origin

    bundle = _copy_bundle(serving_project, tmp_path)
    base = _sharded_base(serving_project, tmp_path / "my-base")
    manifest = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    manifest["base"] = origin.record(base, manifest["base"]["config_sha256"])
    (bundle / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")

    refused = _answer(serving_project, str(bundle), PROMPT, "--base", str(base), cwd=tmp_path)
    assert refused.returncode == 2 and "pickles (model-00003-of-00003)" in refused.stderr, refused.stderr
    assert "--allow-pickle" in refused.stderr
    served = _answer(serving_project, str(bundle), PROMPT, "--base", str(base), "--allow-pickle", cwd=tmp_path)
    assert served.returncode == 0, served.stderr
    at_home = _answer(serving_project, "models/deploy", PROMPT)
    assert json.loads(served.stdout)["answer"] == json.loads(at_home.stdout)["answer"]


def test_publish_sends_only_the_bundles_own_prefix_folder(serving_project, tmp_path):
    """bundle.json's `prefix` is the bundle's word: `"."`, an absolute path, a prefix/ that is a link to a folder
    elsewhere or a link inside it would have `ptune publish` upload files from outside the prefix (here a secret
    beside the bundle). Each is refused naming it, and nothing reaches the (stand-in) hub."""
    bundle = _copy_bundle(serving_project, tmp_path)
    private = tmp_path / "private"
    private.mkdir()
    (private / "id_ed25519").write_text("secret key\n", encoding="utf-8")
    (bundle / "notes.txt").write_text("not for the hub\n", encoding="utf-8")
    manifest_path = bundle / "bundle.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    env = {**serving_project.env, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": FAKE_TOKEN}
    env.pop("HF_HUB_OFFLINE", None)

    def publish(hub):
        return subprocess.run(
            [sys.executable, "-m", "ptune.cli", "publish", "--repo", "x/y", "--bundle", str(bundle)],
            cwd=serving_project.root,
            env={**env, "HF_ENDPOINT": hub.origin},
            capture_output=True,
            text=True,
            timeout=300,
        )

    with hf_hub_stand_in.UploadHub() as hub:
        for prefix in (".", str(private)):
            manifest_path.write_text(json.dumps({**manifest, "prefix": prefix}), encoding="utf-8")
            proc = publish(hub)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert f"prefix {prefix!r} is not the name of a folder inside the bundle" in proc.stderr
        manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
        shutil.rmtree(bundle / "prefix")
        (bundle / "prefix").symlink_to(private, target_is_directory=True)
        linked = publish(hub)
        assert linked.returncode == 2 and "prefix 'prefix' is not the name of a folder" in linked.stderr, linked.stderr
        assert "a folder, not a link" in linked.stderr
        (bundle / "prefix").unlink()
        shutil.copytree(serving_project.root / "models/deploy/prefix", bundle / "prefix")
        (bundle / "prefix" / "more").symlink_to(private, target_is_directory=True)
        inner = publish(hub)
        assert inner.returncode == 2 and "prefix/more: a symbolic link" in inner.stderr, inner.stderr
    assert hub.commits == [] and hub.requests == []
