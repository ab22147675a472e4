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
