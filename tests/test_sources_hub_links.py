"""A hub snapshot is a folder of symbolic links into the cache's blobs/ (Hugging Face): fetch_weights copies (or
hard-links) what they point at into models/base, and refuses a link that leads anywhere else on the machine."""

from __future__ import annotations

import pytest

from ptune.errors import PtuneError
from ptune.stages import fetch_weights


def _snapshot(tmp_path):
    """The layout of the Hugging Face cache: models--org--name/{blobs,snapshots/<commit>}."""
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "c0ffee").write_text('{"model_type": "glm"}\n')
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/c0ffee")
    return repo, snapshot


def test_links_into_the_cache_are_followed(tmp_path):
    repo, snapshot = _snapshot(tmp_path)
    dest = tmp_path / "base"
    dest.mkdir()
    fetch_weights._link_or_copy(snapshot, dest, repo, "fetch_weights.repo org/name")
    assert not (dest / "config.json").is_symlink()
    assert (dest / "config.json").read_text() == '{"model_type": "glm"}\n'


@pytest.mark.parametrize("target", ["secret", "folder"])
def test_a_link_out_of_the_cache_is_refused_naming_it(tmp_path, target):
    repo, snapshot = _snapshot(tmp_path)
    (tmp_path / "secret").write_text("an SSH key\n")
    (tmp_path / "folder").mkdir()
    (snapshot / "tokenizer.model").symlink_to(tmp_path / target)
    dest = tmp_path / "base"
    dest.mkdir()
    with pytest.raises(PtuneError, match=r"fetch_weights.repo org/name: tokenizer.model in .* is a symbolic link to"):
        fetch_weights._link_or_copy(snapshot, dest, repo, "fetch_weights.repo org/name")
    assert not (dest / "tokenizer.model").exists()
