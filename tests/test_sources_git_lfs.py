"""Source git_lfs, for real: Debian's git-lfs against a repository served over file:// and an LFS server on
127.0.0.1; an interrupted transfer, the truncated-file trap a killed `git lfs pull` leaves, corrupt objects."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from ptune.errors import PtuneError
from ptune.sources import git_lfs

from support.lfs_stand_in import LfsRepo, LfsServer, make_lfs_repo


@pytest.fixture
def git_env(env, monkeypatch):
    """The source runs git in this process: give it the tests' private HOME and git config."""
    for key in ("HOME", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_NOSYSTEM"):
        monkeypatch.setenv(key, env[key])
    return env


@pytest.fixture
def lfs_repo(tmp_path, git_env) -> LfsRepo:
    return make_lfs_repo(tmp_path / "hub", git_env)


def _assert_fetched(clone: Path, repo: LfsRepo) -> None:
    for name, data in repo.files.items():
        assert (clone / name).read_bytes() == data, name


def _replace(path: Path, data: bytes) -> None:
    # A new inode: git-lfs hard-links objects from a file:// remote, so writing in place would change both.
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_fetch_checks_out_the_pinned_revision_with_every_lfs_file(lfs_repo, tmp_path):
    clone, commit = git_lfs.fetch(lfs_repo.url, lfs_repo.commit, tmp_path / "work", backoff_s=0)
    assert commit == lfs_repo.commit
    _assert_fetched(clone, lfs_repo)


def test_a_killed_pull_is_repaired_where_git_lfs_pull_alone_keeps_the_truncated_file(lfs_repo, tmp_path, git_env):
    clone, _ = git_lfs.fetch(lfs_repo.url, lfs_repo.commit, tmp_path / "work", backoff_s=0)
    # What a `git lfs pull` killed mid-way leaves: a stale index.lock, empty temp files, a truncated file.
    weights = clone / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(1000)
    (clone / ".git" / "index.lock").touch()
    (clone / ".git" / "lfs" / "tmp").mkdir(parents=True, exist_ok=True)
    (clone / ".git" / "lfs" / "tmp" / "download123").touch()
    subprocess.run(["git", "lfs", "pull"], cwd=clone, env=git_env, capture_output=True)
    assert weights.stat().st_size == 1000, "git lfs pull repaired it: the trap this source works around is gone"

    clone2, _ = git_lfs.fetch(lfs_repo.url, lfs_repo.commit, tmp_path / "work", backoff_s=0)
    assert clone2 == clone
    _assert_fetched(clone, lfs_repo)
    assert not (clone / ".git" / "index.lock").exists()


def test_a_corrupt_remote_object_fails_naming_the_file_and_how_to_resume(lfs_repo, tmp_path):
    good = lfs_repo.files["model.safetensors"]
    _replace(lfs_repo.object_path("model.safetensors"), good[:100] + b"XXXX" + good[104:])
    with pytest.raises(PtuneError) as err:
        git_lfs.fetch(lfs_repo.url, lfs_repo.commit, tmp_path / "work", attempts=2, backoff_s=0)
    message = str(err.value)
    assert "model.safetensors: still a pointer" in message
    assert "tokenizer.model" not in message
    assert "ptune fetch_weights" in message and "lfs pull" in message

    # Once the remote has the right object, the next run resumes in the kept clone and completes.
    _replace(lfs_repo.object_path("model.safetensors"), good)
    clone, _ = git_lfs.fetch(lfs_repo.url, lfs_repo.commit, tmp_path / "work", backoff_s=0)
    _assert_fetched(clone, lfs_repo)


def test_a_corrupt_local_object_is_downloaded_again(lfs_repo, tmp_path):
    clone, _ = git_lfs.fetch(lfs_repo.url, lfs_repo.commit, tmp_path / "work", backoff_s=0)
    oid = hashlib.sha256(lfs_repo.files["tokenizer.model"]).hexdigest()
    local = clone / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    bad = b"Y" * len(lfs_repo.files["tokenizer.model"])
    # Same size, wrong bytes: in the local store and (as `git lfs pull` copies it out) in the working tree.
    _replace(local, bad)
    _replace(clone / "tokenizer.model", bad)
    clone, _ = git_lfs.fetch(lfs_repo.url, lfs_repo.commit, tmp_path / "work", backoff_s=0)
    _assert_fetched(clone, lfs_repo)


def test_an_interrupted_transfer_resumes_where_it_stopped(tmp_path, git_env, monkeypatch, caplog):
    objects: dict[str, bytes] = {}
    # Four downloads cut off half-way: more than git-lfs retries by itself with lfs.transfer.maxretries 1.
    with LfsServer(objects, drops=4) as server:
        repo = make_lfs_repo(tmp_path / "hub", git_env, lfs_url=server.url)
        objects.update({hashlib.sha256(d).hexdigest(): d for n, d in repo.files.items() if n != "config.json"})
        monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
        monkeypatch.setenv("GIT_CONFIG_KEY_0", "lfs.transfer.maxretries")
        monkeypatch.setenv("GIT_CONFIG_VALUE_0", "1")
        with caplog.at_level("WARNING", logger="ptune.sources.git_lfs"):
            clone, _ = git_lfs.fetch(repo.url, repo.commit, tmp_path / "work", backoff_s=0.1)
        _assert_fetched(clone, repo)
        assert "git lfs pull failed (attempt 1 of 5)" in caplog.text  # the retry carried the fetch through
        assert any(r and r != "bytes=0-" for r in server.ranges), (
            f"no download resumed with a Range request: {server.ranges}"
        )


def test_an_unknown_revision_is_named(lfs_repo, tmp_path):
    with pytest.raises(PtuneError, match="fetch_weights.revision: 'v9' is not a commit, branch or tag"):
        git_lfs.fetch(lfs_repo.url, "v9", tmp_path / "work", backoff_s=0)


def _hostile(tmp_path: Path) -> tuple[str, Path]:
    """A value that, where git reads options, makes it run a command: the command leaves a file if it ran."""
    marker = tmp_path / "PWNED"
    return f"--upload-pack=touch {marker};git-upload-pack", marker


def test_a_revision_that_git_would_read_as_an_option_runs_no_command(lfs_repo, tmp_path):
    hostile, marker = _hostile(tmp_path)
    with pytest.raises(PtuneError, match="fetch_weights.revision: '--upload-pack=.*' is not a commit hash"):
        git_lfs.fetch(lfs_repo.url, hostile, tmp_path / "work", backoff_s=0)
    assert not marker.exists()
    # The second layer, on its own: the git commands that take the revision read it after --end-of-options.
    clone, _ = git_lfs.fetch(lfs_repo.url, lfs_repo.commit, tmp_path / "work", backoff_s=0)
    git_lfs._fetch_revision(clone, hostile)
    assert git_lfs._resolve(clone, hostile).returncode != 0
    assert not marker.exists(), "git ran the command given as a revision"


def test_a_repository_url_that_git_would_read_as_an_option_or_a_command_runs_nothing(tmp_path, git_env):
    hostile, marker = _hostile(tmp_path)
    for repo in (hostile, f"ext::sh -c touch% {marker}"):
        with pytest.raises(PtuneError, match="fetch_weights.repo: `git clone"):
            git_lfs.fetch(repo, "a" * 40, tmp_path / "work", attempts=1, backoff_s=0)
        assert not marker.exists(), repo


def test_a_symbolic_link_in_the_repository_is_refused_naming_it(tmp_path, git_env):
    secret = tmp_path / "id_rsa"
    secret.write_text("not for the model folder\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "glm"}\n')
    (src / "tokenizer.model").symlink_to(secret)
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "a link"]):
        subprocess.run(["git", *cmd], cwd=src, env=git_env, check=True, capture_output=True)
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(remote)], env=git_env, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, env=git_env, capture_output=True, text=True)
    with pytest.raises(PtuneError) as err:
        git_lfs.fetch(remote.as_uri(), commit.stdout.strip(), tmp_path / "work", backoff_s=0)
    assert f"tokenizer.model is a symbolic link (to {str(secret)!r})" in str(err.value)
