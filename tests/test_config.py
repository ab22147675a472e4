"""params.yaml is described once, by its JSON Schema; wrong keys and values fail naming the key."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from ptune import config
from ptune.errors import PtuneError

from conftest import REPO, TINY_PARAMS


def _raw():
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", [REPO / "params.yaml", TINY_PARAMS], ids=["default", "tiny"])
def test_shipped_params_are_valid(path):
    params = config.load(path)
    assert params.train.pre_seq_len >= 1
    assert "{content}" in params.preprocess.prompt_template


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda r: r["train"].__setitem__("pre_seq_len", 0), "train.pre_seq_len"),
        (lambda r: r["train"].__setitem__("learning_rate", -1), "train.learning_rate"),
        (lambda r: r["train"].__setitem__("learning_rate", "2e-2"), "train.learning_rate"),
        (lambda r: r["evaluate"].__setitem__("max_new_tokns", 5), "max_new_tokns"),
        (lambda r: r["fetch_data"].__setitem__("source", "ftp"), "fetch_data.source"),
        (lambda r: r["preprocess"].__setitem__("prompt_template", "no placeholder"), "preprocess.prompt_template"),
        (lambda r: r.pop("report"), "report"),
    ],
)
def test_invalid_params_name_the_key(edit, named):
    raw = copy.deepcopy(_raw())
    edit(raw)
    with pytest.raises(PtuneError) as err:
        config.from_dict(raw)
    assert named in str(err.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  seed: [1\n", encoding="utf-8")
    with pytest.raises(PtuneError, match=r"params.yaml: line \d+"):
        config.load(bad)


def _schema_keys(node) -> set[str]:
    # Metric names (`rouge-l`) are keys in params.yaml and fields with underscores in the dataclasses.
    return {key.replace("-", "_") for key in node.get("properties", {})}


@pytest.mark.parametrize("path", [REPO / "params.yaml", TINY_PARAMS], ids=["default", "tiny"])
def test_dataclasses_and_schema_name_the_same_keys(path):
    schema = config.load_schema()
    params = config.load(path)
    for section in _schema_keys(schema):
        obj = getattr(params, section)
        fields = {f.name for f in dataclasses.fields(obj)}
        assert fields == _schema_keys(schema["properties"][section]), section
        for name in fields:
            sub = getattr(obj, name)
            if dataclasses.is_dataclass(sub):
                assert {f.name for f in dataclasses.fields(sub)} == _schema_keys(
                    schema["properties"][section]["properties"][name]
                ), f"{section}.{name}"


def test_report_reference_is_typed_and_checked():
    params = config.load(TINY_PARAMS)
    assert params.report.reference.score("rouge-l") == 24.97
    raw = copy.deepcopy(_raw())
    raw["report"]["reference"] = {
        "name": "x",
        "bleu-4": 8.1,
        "rouge-1": 31.12,
        "rouge-2": 7.11,
        "rouge-l": 124,
        "tolerance": 0.5,
    }
    with pytest.raises(PtuneError, match=r"report\.reference\.rouge-l"):
        config.from_dict(raw)


@pytest.mark.parametrize(
    "section, key, cap",
    [
        ("evaluate", "max_new_tokens", 32768),
        ("deploy", "max_new_tokens", 32768),
        ("evaluate", "batch_size", 4096),
        ("train", "per_device_train_batch_size", 4096),
        ("train", "pre_seq_len", 4096),
    ],
)
def test_sizes_that_no_real_run_reaches_are_refused(section, key, cap):
    """10^9 new tokens or a batch of 10^6 was accepted, and failed hours later as an allocation of terabytes."""
    raw = copy.deepcopy(_raw())
    raw[section][key] = cap
    config.from_dict(raw)
    for huge in (cap + 1, 10**9):
        raw[section][key] = huge
        with pytest.raises(PtuneError, match=rf"{section}\.{key}: {huge} is greater than the maximum of {cap}"):
            config.from_dict(raw)


def _git_lfs_params(**fetch_weights):
    raw = copy.deepcopy(_raw())
    raw["fetch_weights"].update(source="git_lfs", repo="https://huggingface.co/THUDM/chatglm-6b", revision="a" * 40)
    raw["fetch_weights"].update(fetch_weights)
    return raw


@pytest.mark.parametrize(
    "edit, named",
    [
        (
            {"revision": "--upload-pack=touch PWNED"},
            "fetch_weights.revision: '--upload-pack=touch PWNED' does not match",
        ),
        ({"repo": "--upload-pack=touch PWNED"}, "fetch_weights.repo: '--upload-pack=touch PWNED' does not match"),
        ({"revision": "main..HEAD"}, "fetch_weights.revision: 'main..HEAD' is not a commit hash or a valid branch"),
        ({"revision": "v1 --upload-pack=x"}, "a space, a control character"),
        ({"revision": "HEAD@{1}"}, "'@{'"),
        ({"revision": "main^{tree}"}, "a space, a control character"),
        ({"revision": "refs/heads/.hidden"}, "starts with '.'"),
    ],
)
def test_a_revision_or_repo_git_would_read_as_an_option_or_syntax_is_refused(edit, named):
    with pytest.raises(PtuneError) as err:
        config.from_dict(_git_lfs_params(**edit))
    assert named in str(err.value)


@pytest.mark.parametrize("revision", ["a" * 40, "b" * 64, "main", "v1.0", "refs/pr/12", "release/2024-06"])
def test_commits_branches_and_tags_pass(revision):
    assert config.from_dict(_git_lfs_params(revision=revision)).fetch_weights.revision == revision


@pytest.mark.parametrize(
    "key, value",
    [
        ("fetch_weights.repo", "https://hf_user:hf_SECRETTOKEN@huggingface.co/THUDM/chatglm-6b"),
        ("fetch_weights.repo", "https://ghp_SECRETTOKEN@github.com/org/model.git"),
        ("fetch_data.url", "https://user:SECRETTOKEN@example.com/AdvertiseGen.tar.gz"),
        # Also where the schema would refuse the value anyway, and print it in its message.
        ("fetch_data.url", "ftp://user:SECRETTOKEN@example.com/AdvertiseGen.tar.gz"),
    ],
)
def test_credentials_in_a_url_are_refused_without_being_repeated(key, value):
    raw = _git_lfs_params()
    raw["fetch_data"].update(source="url", url="https://example.com/AdvertiseGen.tar.gz", sha256="0" * 64)
    section, name = key.split(".")
    raw[section][name] = value
    with pytest.raises(PtuneError) as err:
        config.from_dict(raw)
    message = str(err.value)
    assert message.startswith(f"{key}: {value.split(':')[0]}://***@") and "carries credentials" in message
    assert "HF_TOKEN" in message and "credential helper" in message
    assert "SECRETTOKEN" not in message


def test_an_ssh_account_name_is_no_credential():
    params = config.from_dict(_git_lfs_params(repo="ssh://git@hf.co/THUDM/chatglm-6b"))
    assert params.fetch_weights.repo == "ssh://git@hf.co/THUDM/chatglm-6b"


def test_fetch_data_url_is_https_unless_local_or_allowed():
    raw = copy.deepcopy(_raw())
    raw["fetch_data"].update(source="url", url="http://example.com/AdvertiseGen.tar.gz", sha256="0" * 64)
    with pytest.raises(PtuneError, match=r"fetch_data\.url: http://example\.com/.* plain http.*fetch_data\.allow_http"):
        config.from_dict(raw)
    assert config.from_dict({**raw, "fetch_data": {**raw["fetch_data"], "allow_http": True}}).fetch_data.allow_http
    for local in ("http://127.0.0.1:8000/a.tgz", "http://localhost/a.tgz", "http://[::1]:80/a.tgz"):
        raw["fetch_data"]["url"] = local
        assert config.from_dict(raw).fetch_data.url == local
    raw["fetch_data"]["url"] = "https://cloud.tsinghua.edu.cn/f/b3f119a008264b1cabd1/?dl=1"
    params = config.from_dict(raw)
    assert (
        params.fetch_data.allow_http,
        params.fetch_data.max_unpacked_bytes,
        params.fetch_data.max_archive_members,
    ) == (
        False,
        8 << 30,
        100_000,
    )


def test_params_written_before_issue_38_keep_working():
    """The intervals' and the general set's keys are optional: an older params file gets their defaults."""
    raw = _raw()
    for key in (
        "bootstrap_resamples",
        "confidence",
        "general_examples",
        "general_generations",
        "general_max_new_tokens",
    ):
        raw["evaluate"].pop(key)
    raw["fetch_data"].pop("general_file")
    raw["fetch_data"]["embedded"].pop("general_size")
    params = config.from_dict(raw)
    assert (params.evaluate.bootstrap_resamples, params.evaluate.confidence) == (1000, 0.95)
    assert (params.evaluate.general_examples, params.fetch_data.embedded.general_size) == (100, 100)
    assert params.fetch_data.general_file == ""
