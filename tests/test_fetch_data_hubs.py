"""`fetch_data.source: hf_hub | modelscope`: a data set pinned by a hub revision, in one step, as a user runs it.

The real huggingface_hub and modelscope libraries download the small real ADGEN sample the tests ship
(tests/fixtures/adgen) from stand-ins of each hub on 127.0.0.1 (HF_ENDPOINT, MODELSCOPE_ENDPOINT), into caches under
the test's temp folder: as parquet from the Hugging Face hub, as JSON lines from ModelScope. data/raw then holds
the bytes the `path` source writes from the same sample; the commit is recorded; with the hub out of reach the
cached snapshot is used with a warning, and a revision neither reachable nor cached fails naming it. The original
ADGEN's figures are checked for the hubs' ADGEN ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ptune import config
from ptune.data import adgen, hub_splits
from ptune.errors import PtuneError

from conftest import REPO, make_project
from support import hf_hub_stand_in, modelscope_stand_in
from support.http_files import FileServer

SAMPLE = REPO / "tests" / "fixtures" / "adgen"
SHARED_DEV = REPO.parent / "shared" / "data" / "adgen" / "dev.json"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ABSENT = "f" * 40


@pytest.fixture
def project(tmp_path, env):
    p = make_project(tmp_path / "project", env)
    # Every cache under this test's folder; the Hugging Face hub allowed (conftest sets HF_HUB_OFFLINE=1).
    p.env = {
        **p.env,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub"),
        "HF_HUB_OFFLINE": "0",
        "MODELSCOPE_CACHE": str(tmp_path / "ms-cache"),
        # One listing attempt, not four with back-off, when the hub is out of reach (only to keep the test short).
        "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1",
    }
    return p


def _fetch_data(project, **keys) -> None:
    """Set fetch_data keys in params.yaml (added where the tiny params file lacks them)."""
    path = project.root / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params["fetch_data"].update(keys)
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")


def _raw(project) -> dict[str, bytes]:
    raw = project.root / "data" / "raw"
    return {name: (raw / name).read_bytes() for name in ("train.json", "dev.json")}


def _record(project) -> dict:
    return json.loads((project.root / "data" / "raw" / "ptune_source.json").read_text(encoding="utf-8"))


def _parquet(jsonl: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _path_source_bytes(project) -> dict[str, bytes]:
    _fetch_data(project, source="path", path=str(SAMPLE))
    project.run("ptune", "fetch_data")
    return _raw(project)


# What the source says for each revision, as `ptune fetch_data` would say it (PtuneError), or the folder it gives.
_OUTCOMES = """
import sys
from ptune.errors import PtuneError
from ptune.sources import hub
source, repo = sys.argv[1:3]
for revision in sys.argv[3:]:
    try:
        fetch = hub.hf_hub if source == "hf_hub" else hub.modelscope
        print("FOLDER", fetch(repo, revision, repo_type=hub.DATASET, key="fetch_data.repo"))
    except PtuneError as exc:
        print("ERROR", exc)
"""


def _outcomes(project, source: str, repo: str, *revisions: str, **env: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _OUTCOMES, source, repo, *revisions],
        env={**project.env, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith(("FOLDER", "ERROR"))]


def test_hf_hub_data_set_in_parquet_gives_the_path_sources_bytes_records_its_commit_and_falls_back_to_the_cache(
    project,
):
    expected = _path_source_bytes(project)
    repo = "ptune-tests/adgen-sample"
    files = {
        "README.md": b"---\nlicense: unknown\n---\nADGEN sample\n",
        "data/train-00000-of-00001.parquet": _parquet(SAMPLE / "train.json"),
        "data/validation-00000-of-00001.parquet": _parquet(SAMPLE / "dev.json"),
    }
    with hf_hub_stand_in.serve(*hf_hub_stand_in.routes(repo, COMMIT, files)) as hub:
        project.env = {**project.env, "HF_ENDPOINT": hub.url("")}
        _fetch_data(project, source="hf_hub", repo=repo, revision="main")
        proc = project.run("ptune", "fetch_data")
        assert _raw(project) == expected
        record = _record(project)
        assert record["revision"] == COMMIT and record["requested"] == "main" and record["repo"] == repo
        assert sorted(record["files"]) == sorted(files) and record["source"] == "hf_hub"
        # A branch: the commit it resolved to is named, to pin.
        assert f"set fetch_data.revision: {COMMIT}" in proc.stderr
        assert all(path.startswith(("/api/", "HEAD /datasets/", "/datasets/")) for path, _ in hub.requests)

        # A revision the hub does not have: named, with the hub's answer.
        [missing] = _outcomes(project, "hf_hub", repo, ABSENT)
        assert missing.startswith(f"ERROR fetch_data.repo: {repo}@{ABSENT} from the Hugging Face hub")
        assert "Check the id and the revision on the data set's page" in missing

    # The hub out of reach (its endpoint gone): the cached snapshot, with a warning; the same bytes and record.
    (project.root / "data" / "raw" / "ptune_source.json").unlink()
    proc = project.run("ptune", "fetch_data")
    assert "cannot be reached" in proc.stderr and "using the cached snapshot" in proc.stderr
    assert _raw(project) == expected and _record(project) == record
    # HF_HUB_OFFLINE=1 as well; and a revision not cached fails naming the repository and the revision.
    cached, missing = _outcomes(project, "hf_hub", repo, "main", ABSENT, HF_HUB_OFFLINE="1")
    assert cached.startswith("FOLDER ") and cached.endswith(COMMIT)
    assert f"ERROR fetch_data.repo: {repo}@{ABSENT} is not in the Hugging Face cache" in missing
    assert "HF_ENDPOINT" in missing


def test_a_hub_data_sets_readme_cannot_make_fetch_data_read_a_file_outside_it_or_a_url(project, tmp_path):
    """A README's `configs: data_files:` naming an absolute path, a `../` path and an http URL is not followed: the
    splits come from the snapshot's own file names, nothing outside it is read, and the URL gets no request."""
    secret = {"content": "outside-the-repository", "summary": "read from this machine"}
    (tmp_path / "absolute.json").write_text(json.dumps(secret) + "\n", encoding="utf-8")
    (tmp_path / "dotdot.json").write_text(json.dumps(secret) + "\n", encoding="utf-8")
    repo = "ptune-tests/hostile-card"
    files = {name: (SAMPLE / name).read_bytes() for name in ("train.json", "dev.json")}
    with FileServer({"/x.json": json.dumps(secret).encode() + b"\n"}) as elsewhere:
        # The snapshot is tmp_path/hf-home/hub/datasets--ptune-tests--hostile-card/snapshots/<commit>.
        files["README.md"] = (
            "---\nconfigs:\n- config_name: default\n  data_files:\n"
            f"  - split: train\n    path: {tmp_path / 'absolute.json'}\n"
            "  - split: validation\n    path: ../../../../../dotdot.json\n"
            f"  - split: test\n    path: {elsewhere.url('/x.json')}\n---\n"
        ).encode()
        with hf_hub_stand_in.serve(*hf_hub_stand_in.routes(repo, COMMIT, files)) as hub:
            project.env = {**project.env, "HF_ENDPOINT": hub.url("")}
            _fetch_data(project, source="hf_hub", repo=repo, revision=COMMIT, expect="none")
            proc = project.run("ptune", "fetch_data")
        assert elsewhere.requests == []
    assert _raw(project) == {"train.json": files["train.json"], "dev.json": files["dev.json"]}
    assert "README.md's `configs` are not used" in proc.stderr


def test_a_hub_snapshots_data_files_are_read_only_as_plain_files_inside_its_repository(tmp_path):
    """What the split patterns find is read only when its real path is a file of the repository's folder, and not
    an archive or compressed file (the json and csv builders would unpack it); a named file likewise."""
    import gzip

    repo = tmp_path / "repo"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "train").write_bytes((SAMPLE / "train.json").read_bytes())
    (snapshot / "train.json").symlink_to(repo / "blobs" / "train")  # as a Hugging Face snapshot links its files
    (tmp_path / "outside.json").write_bytes((SAMPLE / "dev.json").read_bytes())
    (snapshot / "dev.json").symlink_to(tmp_path / "outside.json")
    (snapshot / "test.json").write_bytes(gzip.compress((SAMPLE / "dev.json").read_bytes()))
    rows = hub_splits.load(snapshot, {"train": "train"}, "x", within=repo)
    assert len(rows["train"]) == 100
    with pytest.raises(PtuneError, match=r"^fetch_data.dev_split: dev.json of x leads to .*outside.json, which is not"):
        hub_splits.load(snapshot, {"dev": "validation"}, "x", within=repo)
    with pytest.raises(PtuneError, match=r"test.json of x is a gzip archive or compressed file, not plain json"):
        hub_splits.load(snapshot, {"dev": "test.json"}, "x", within=repo)


def test_modelscope_data_set_in_json_lines_gives_the_path_sources_bytes_and_falls_back_to_the_cache(project):
    pytest.importorskip("modelscope", reason="the modelscope extra is not installed (`pip install -e '.[modelscope]'`)")
    repo = "ptune-tests/adgen-sample"
    # ADGEN's own file names: dev.json is the split the datasets library names validation.
    files = {name: (SAMPLE / name).read_bytes() for name in ("train.json", "dev.json")}
    expected = files  # what the path source writes from the sample: its lines unchanged (the test above runs it)
    with modelscope_stand_in.serve(modelscope_stand_in.routes(repo, "master", files, repo_type="dataset")) as hub:
        endpoint = hub.url("")
        project.env = {**project.env, "MODELSCOPE_ENDPOINT": endpoint}
        _fetch_data(project, source="modelscope", repo=repo, revision="master")
        proc = project.run("ptune", "fetch_data")
        assert _raw(project) == expected
        record = _record(project)
        assert record == {
            "source": "modelscope",
            "repo": repo,
            "revision": "master",
            "train_split": "train",
            "dev_split": "validation",
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        }
        assert "is not a commit" in proc.stderr
        asked = [path for path, _ in hub.requests if path.startswith(f"/api/v1/datasets/{repo}/")]
        assert len(asked) == 1 + len(files) and all("Revision=master&" in path for path in asked)

    proc = project.run("ptune", "fetch_data")
    assert "ModelScope" in proc.stderr and "cannot be reached; using the cached snapshot" in proc.stderr
    assert _raw(project) == expected and _record(project) == record
    [missing] = _outcomes(project, "modelscope", repo, ABSENT)
    assert f"ERROR fetch_data.repo: {repo}@{ABSENT} is not in the ModelScope cache" in missing


def test_the_hubs_adgen_is_checked_against_the_original_naming_the_split_that_differs(project):
    """HasturOfficial/adgen serving the 100-line sample is not the original ADGEN: the stage says which split."""
    files = {name: (SAMPLE / name).read_bytes() for name in ("train.json", "dev.json")}
    with hf_hub_stand_in.serve(*hf_hub_stand_in.routes("HasturOfficial/adgen", COMMIT, files)) as hub:
        project.env = {**project.env, "HF_ENDPOINT": hub.url("")}
        _fetch_data(project, source="hf_hub", repo="HasturOfficial/adgen", revision=COMMIT)
        proc = project.run("ptune", "fetch_data", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert (
            f"fetch_data.repo HasturOfficial/adgen@{COMMIT} (fetch_data.expect: auto): the dev split has 100 "
            "examples where the original ADGEN's dev.json has 1,070" in proc.stderr
        )
        assert "fetch_data.expect: none" in proc.stderr
        assert not (project.root / "data" / "raw").exists()
        _fetch_data(project, expect="none")
        project.run("ptune", "fetch_data")
        assert _raw(project) == files


def test_the_original_adgen_check_passes_the_real_dev_split_and_names_a_changed_one(tmp_path):
    """The figures of the original: the whole dev split (shared beside the checkout) passes byte for byte."""
    if not SHARED_DEV.is_file():
        pytest.skip(f"{SHARED_DEV} is absent (the shared ADGEN dev split is provided beside the repository)")
    (tmp_path / "dev.json").write_bytes(SHARED_DEV.read_bytes())
    (tmp_path / "train.json").write_bytes((SAMPLE / "train.json").read_bytes())
    with pytest.raises(PtuneError, match=r"x: the train split has 100 examples where the original ADGEN's train.json"):
        adgen.check(tmp_path, "x")  # dev passed: its count and sha256
    dev = SHARED_DEV.read_bytes().replace("简约".encode(), "简单".encode(), 1)
    (tmp_path / "dev.json").write_bytes(dev)
    with pytest.raises(PtuneError, match=r"data/raw/dev.json written from it has sha256 [0-9a-f]{64}, not 96b63cfd"):
        adgen.check(tmp_path, "x")


def _params(**fetch_data) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["fetch_data"].update(fetch_data)
    return raw


@pytest.mark.parametrize(
    "keys, named",
    [
        ({"repo": "https://huggingface.co/datasets/HasturOfficial/adgen"}, "fetch_data.repo: 'https://huggingface.co"),
        ({"repo": "https://user:SECRET@hf.co/datasets/x/y"}, "fetch_data.repo: https://***@hf.co"),
        ({"repo": "--upload-pack=x"}, "fetch_data.repo: '--upload-pack=x' does not match"),
        ({"revision": "main..HEAD"}, "fetch_data.revision: 'main..HEAD' is not a commit hash or a valid branch"),
        ({"revision": ""}, "fetch_data.revision: '' should be non-empty"),
        ({"train_split": "-x"}, "fetch_data.train_split: '-x' does not match"),
        ({"expect": "yes"}, "fetch_data.expect: 'yes' is not one of ['auto', 'adgen', 'none']"),
    ],
)
def test_hub_data_params_are_checked_like_the_weights(keys, named):
    raw = _params(source="hf_hub", repo="HasturOfficial/adgen", revision="main")
    raw["fetch_data"].update(keys)
    with pytest.raises(PtuneError) as err:
        config.from_dict(raw)
    assert named in str(err.value)
    assert "SECRET" not in str(err.value)


def test_a_params_file_without_the_hub_keys_keeps_its_meaning():
    raw = _params()
    for key in ("repo", "revision", "train_split", "dev_split", "expect"):
        raw["fetch_data"].pop(key)
    cfg = config.from_dict(raw).fetch_data
    assert (cfg.repo, cfg.revision, cfg.train_split, cfg.dev_split, cfg.expect) == (
        "",
        "",
        "train",
        "validation",
        "auto",
    )


def test_doctor_checks_the_data_source_like_the_weights(project):
    _fetch_data(project, source="hf_hub", repo="HasturOfficial/adgen", revision="main")
    proc = subprocess.run(
        ["ptune", "doctor"],
        cwd=project.root,
        env={**project.env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert "PROBLEM  data: HasturOfficial/adgen@main (Hugging Face hub data set): not in the hub's cache" in proc.stdout
    assert "HF_HUB_OFFLINE is set: the run cannot fetch it" in proc.stdout
    assert "what to do: unset HF_HUB_OFFLINE" in proc.stdout
