"""The fetch stages as a user runs them (`ptune fetch_weights`, `ptune fetch_data`, `dvc repro`): every source
ends in the same checked folder; pointer-only clones, busy folders and missing hub snapshots fail clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ptune.sources import lfs_pointer, lock

from conftest import REPO, make_project
from support import modelscope_stand_in
from support.lfs_stand_in import make_lfs_repo

SNAPSHOT = REPO.parent / "shared" / "chatglm-6b-snapshot"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def project(tmp_path, env):
    return make_project(tmp_path / "project", env)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_chatglm6b_pointer_snapshot_is_recognised_file_by_file():
    if not SNAPSHOT.is_dir():
        pytest.skip(f"{SNAPSHOT} is absent (the shared ChatGLM-6B snapshot is provided beside the repository)")
    found = lfs_pointer.pointer_files(SNAPSHOT)
    assert sorted(map(str, found)) == ["ice_text.model"] + [f"pytorch_model-0000{i}-of-00008.bin" for i in range(1, 9)]
    assert found[Path("ice_text.model")] == lfs_pointer.Pointer(
        "5e974d9a69c242ce014c88c2b26089270f6198f3c0b700a887666cd3e816f17e", 2706249
    )


def test_a_model_folder_of_lfs_pointers_fails_naming_them_and_git_lfs_pull(project):
    if not SNAPSHOT.is_dir():
        pytest.skip(f"{SNAPSHOT} is absent")
    project.set_param("fetch_weights.source", "path")
    project.set_param("fetch_weights.path", str(SNAPSHOT))
    proc = project.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2
    assert "9 file(s) are Git LFS pointers" in proc.stderr
    assert "ice_text.model (a pointer to 2,706,249 bytes" in proc.stderr
    assert "pytorch_model-00008-of-00008.bin" in proc.stderr
    assert f"git -C {SNAPSHOT} lfs pull" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (project.root / "models" / "base").exists()


def test_git_lfs_source_fills_models_base_and_cleans_its_state(project, tmp_path):
    repo = make_lfs_repo(tmp_path / "hub", project.env)
    project.set_param("fetch_weights.source", "git_lfs")
    project.set_param("fetch_weights.repo", repo.url)
    project.set_param("fetch_weights.revision", repo.commit)
    project.run("ptune", "fetch_weights")
    base = project.root / "models" / "base"
    record = json.loads((base / "ptune_source.json").read_text())
    assert record == {
        "source": "git_lfs",
        "backend": "transformers",
        "trust_remote_code": False,
        "allow_pickle": False,
        "repo": repo.url,
        "revision": repo.commit,
    }
    assert {k: v for k, v in _files(base).items() if k in repo.files} == repo.files
    assert not (base / ".git").exists()
    assert not list((project.root / ".ptune" / "state" / "fetch_weights").iterdir())


def _hub_cache(root: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache holding one snapshot, laid out as huggingface_hub lays it out (blobs, snapshots of
    symlinks, refs): what a machine has after an earlier download."""
    import hashlib

    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("..", "..", "blobs", blob.name) if "/" not in name else blob)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return root


def test_hf_hub_source_works_offline_from_a_filled_cache(pipeline_run, project, tmp_path):
    model = _files(pipeline_run.root / "models" / "base")
    model.pop("ptune_source.json")
    cache = _hub_cache(tmp_path / "hf-cache", "ptune/tiny-glm", COMMIT, model)
    project.env = {**project.env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    project.set_param("fetch_weights.source", "hf_hub")
    project.set_param("fetch_weights.repo", "ptune/tiny-glm")
    project.set_param("fetch_weights.revision", COMMIT)
    project.run("ptune", "fetch_weights")
    base = project.root / "models" / "base"
    assert {k: v for k, v in _files(base).items() if k != "ptune_source.json"} == model
    assert json.loads((base / "ptune_source.json").read_text())["revision"] == COMMIT
    # A revision the cache lacks, with the hub out of reach: a message, not a traceback.
    project.set_param("fetch_weights.revision", "f" * 40)
    proc = project.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2 and "is not in the Hugging Face cache" in proc.stderr and "HF_ENDPOINT" in proc.stderr


def _local_model(pipeline_run, folder: Path) -> Path:
    """A transformers model folder of the user's: the tiny pipeline's base, copied."""
    shutil.copytree(pipeline_run.root / "models" / "base", folder, ignore=shutil.ignore_patterns("ptune_source.json"))
    return folder


def test_path_source_refuses_links_leading_out_of_the_folder_or_to_a_folder(pipeline_run, project, tmp_path):
    """A link to a file of this machine, or to a whole folder, is not copied into models/base (which is pushed and
    bundled): the fetch stops naming each link, before reading anything, and leaves no models/base."""
    model = _local_model(pipeline_run, tmp_path / "model")
    (tmp_path / "secret.txt").write_text("a token")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "id_ed25519").write_text("a key")
    (model / "notes.txt").symlink_to(tmp_path / "secret.txt")
    (model / "extra").symlink_to(tmp_path / "home")
    project.set_param("fetch_weights.source", "path")
    project.set_param("fetch_weights.path", str(model))
    proc = project.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        f"fetch_weights.path {model}: 2 symbolic link(s) lead out of the folder or to a folder: "
        f"extra -> {tmp_path / 'home'}, notes.txt -> {tmp_path / 'secret.txt'}" in proc.stderr
    )
    assert "fetch_weights.source: hf_hub" in proc.stderr
    assert not (project.root / "models" / "base").exists()


@pytest.mark.slow  # a whole fetch_weights run (11 s on 2 busy cores); the default test above checks the refusal
def test_path_source_copies_a_link_to_a_file_inside_the_folder_as_that_file(pipeline_run, project, tmp_path):
    model = _local_model(pipeline_run, tmp_path / "model")
    (model / "README.md").symlink_to("config.json")
    project.set_param("fetch_weights.source", "path")
    project.set_param("fetch_weights.path", str(model))
    project.run("ptune", "fetch_weights")
    base = project.root / "models" / "base"
    assert not (base / "README.md").is_symlink()
    assert (base / "README.md").read_bytes() == (model / "config.json").read_bytes()
    assert json.loads((base / "ptune_source.json").read_text())["path"] == str(model)


# What the source says for each revision, as `ptune fetch_weights` would say it (PtuneError), or the folder it gives.
_MODELSCOPE_OUTCOMES = """
import sys
from ptune.errors import PtuneError
from ptune.sources import hub
for revision in sys.argv[2:]:
    try:
        print("FOLDER", hub.modelscope(sys.argv[1], revision))
    except PtuneError as exc:
        print("ERROR", exc)
"""


def test_modelscope_source_downloads_a_pinned_revision_from_the_endpoint_set_and_falls_back_to_its_cache(
    pipeline_run, project, tmp_path
):
    """The real modelscope.snapshot_download against a stand-in of the hub on 127.0.0.1 (MODELSCOPE_ENDPOINT)."""
    pytest.importorskip(
        "modelscope",
        reason="the modelscope extra is not installed (`pip install -e '.[modelscope]'`, "
        "which the test extra includes)",
    )
    model = _files(pipeline_run.root / "models" / "base")
    model.pop("ptune_source.json")
    repo, absent = "ptune/tiny-glm", "c" * 40
    base = project.root / "models" / "base"
    project.set_param("fetch_weights.source", "modelscope")
    project.set_param("fetch_weights.repo", repo)
    project.set_param("fetch_weights.revision", COMMIT)
    # One listing attempt, not four with back-off, when the hub is out of reach (only to keep the test short).
    env = {**project.env, "MODELSCOPE_CACHE": str(tmp_path / "ms-cache"), "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1"}

    def outcomes(*revisions: str) -> list[str]:
        proc = subprocess.run(
            [sys.executable, "-c", _MODELSCOPE_OUTCOMES, repo, *revisions],
            env=project.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return [line for line in proc.stdout.splitlines() if line.startswith(("FOLDER", "ERROR"))]

    with modelscope_stand_in.serve(modelscope_stand_in.routes(repo, COMMIT, model)) as hub:
        endpoint = hub.url("")
        project.env = {**env, "MODELSCOPE_ENDPOINT": endpoint}
        project.run("ptune", "fetch_weights")
        assert {k: v for k, v in _files(base).items() if k != "ptune_source.json"} == model
        assert json.loads((base / "ptune_source.json").read_text()) == {
            "source": "modelscope",
            "backend": "transformers",
            "trust_remote_code": False,
            "allow_pickle": False,
            "repo": repo,
            "revision": COMMIT,
        }
        # Every request went to the endpoint set, for the pinned revision only: the listing, then each file once.
        asked = [path for path, _ in hub.requests if path.startswith(f"/api/v1/models/{repo}/")]
        assert len(asked) == 1 + len(model) and all(f"Revision={COMMIT}&" in path for path in asked)

        [missing] = outcomes(absent)
        assert missing.startswith(f"ERROR fetch_weights.repo: {repo}@{absent} from ModelScope ({endpoint})")
        assert "[404]" in missing and "Check the id and the revision" in missing

    # The hub out of reach: the pinned revision comes from the cache it filled, with a warning; another fails.
    (base / "ptune_source.json").unlink()
    proc = project.run("ptune", "fetch_weights")
    assert "cannot be reached; using the cached snapshot" in proc.stderr
    assert {k: v for k, v in _files(base).items() if k != "ptune_source.json"} == model
    assert json.loads((base / "ptune_source.json").read_text())["revision"] == COMMIT
    [missing] = outcomes(absent)
    assert f"{repo}@{absent} is not in the ModelScope cache" in missing and "MODELSCOPE_ENDPOINT" in missing


def test_a_model_folder_without_weights_or_missing_a_shard_its_index_names_is_refused(tmp_path):
    """What a download cut short leaves (config.json, some shards or none): named, not taken for a model."""
    from ptune.errors import PtuneError
    from ptune.stages.fetch_weights import check_model_dir

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PtuneError, match=r"has a config.json but no weights \(\*.safetensors or \*.bin\)"):
        check_model_dir(tmp_path, "fetch_weights.repo x")
    shards = {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {f"layer.{i}": name for i, name in enumerate(sorted(shards))}})
    )
    for name in sorted(shards)[:2]:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(
        PtuneError,
        match=r"model.safetensors.index.json names 1 weight file\(s\) missing .*"
        r"model-00003-of-00003.safetensors; the download did not finish",
    ):
        check_model_dir(tmp_path, "fetch_weights.repo x")
    (tmp_path / "model-00003-of-00003.safetensors").write_bytes(b"x")
    check_model_dir(tmp_path, "fetch_weights.repo x")


def test_modelscope_source_without_its_package_says_how_to_install_it(project):
    import importlib.util

    if importlib.util.find_spec("modelscope") is not None:
        pytest.skip("modelscope is installed here; this checks the message for when it is not")
    project.set_param("fetch_weights.source", "modelscope")
    project.set_param("fetch_weights.repo", "ZhipuAI/glm-4-9b-chat-hf")
    project.set_param("fetch_weights.revision", "master")
    proc = project.run("ptune", "fetch_weights", check=False)
    assert proc.returncode == 2
    assert "pip install -e '.[modelscope]'" in proc.stderr
    assert "https://www.modelscope.cn/ZhipuAI/glm-4-9b-chat-hf.git" in proc.stderr


def test_a_second_fetch_into_the_same_folder_is_refused(project, monkeypatch):
    monkeypatch.chdir(project.root)
    with lock.exclusive(Path("data/raw")):
        proc = project.run("ptune", "fetch_data", check=False)
    assert proc.returncode == 2
    assert "data/raw: another process (pid" in proc.stderr and "is fetching into it" in proc.stderr


def test_fetch_data_path_source_with_missing_file_lists_the_folder(project, tmp_path):
    data = tmp_path / "mydata"
    data.mkdir()
    (data / "train.csv").write_text("q,a\n你好,您好\n", encoding="utf-8")
    project.set_param("fetch_data.source", "path")
    project.set_param("fetch_data.path", str(data))
    proc = project.run("ptune", "fetch_data", check=False)
    assert proc.returncode == 2
    assert f"fetch_data.train_file: {data / 'train.json'} does not exist; {data} holds ['train.csv']" in proc.stderr


def test_own_multi_turn_csv_reaches_preprocess_as_a_multi_turn_prompt(ran_project, tmp_path):
    data = tmp_path / "chat"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.csv").write_text(
            "question,answer,turns\n"
            "推荐一件上衣,白色衬衫,\n"
            '有红色的吗,有红色衬衫,"[[""推荐一件上衣"", ""白色衬衫""]]"\n',
            encoding="utf-8",
        )
    p = ran_project
    params = yaml.safe_load((p.root / "params.yaml").read_text(encoding="utf-8"))
    params["fetch_data"].update(
        source="path",
        path=str(data),
        train_file="train.csv",
        dev_file="dev.csv",
        prompt_column="question",
        response_column="answer",
        history_column="turns",
    )
    params["preprocess"].update(
        max_source_length=200, prompt_template="{history}[Round {round}]\n\n问：{content}\n\n答："
    )
    (p.root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    p.run("dvc", "repro", "preprocess")
    assert p.executed() == ["fetch_data", "preprocess"]
    raw = [json.loads(line) for line in (p.root / "data" / "raw" / "train.json").read_text().splitlines()]
    assert raw[1] == {"content": "有红色的吗", "summary": "有红色衬衫", "history": [["推荐一件上衣", "白色衬衫"]]}
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(p.root / "models" / "base"))
    dev = load_from_disk(str(p.root / "data" / "processed"))["dev"]
    assert tok.decode(dev[1]["input_ids"]) == (
        "[Round 1]\n\n问：推荐一件上衣\n\n答：白色衬衫\n\n[Round 2]\n\n问：有红色的吗\n\n答："
    )
