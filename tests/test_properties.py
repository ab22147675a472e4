"""Property-based: whatever params document or data file a user writes, ptune either accepts it or fails with its
own error and a message, never an unhandled traceback."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptune import config
from ptune.data import adgen
from ptune.errors import PtuneError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))


ALL_PATHS = list(_paths(SHIPPED))


@st.composite
def params_documents(draw):
    """The shipped params with a few random edits: a value replaced, a key removed, an unknown key added."""
    doc = copy.deepcopy(SHIPPED)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent = doc
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(("set", "delete", "add")))
        if action == "set":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            parent.pop(path[-1], None)
        else:
            parent[draw(st.text(min_size=1, max_size=10))] = draw(values)
    return doc


def _accepts_or_names_the_problem(load) -> None:
    try:
        load()
    except PtuneError as exc:
        assert str(exc).strip(), "an error without a message"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params_documents())
def test_any_params_document_is_accepted_or_refused_with_a_message(doc):
    _accepts_or_names_the_problem(lambda: config.from_dict(doc))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_any_params_text_is_accepted_or_refused_with_a_message(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    _accepts_or_names_the_problem(lambda: config.load(path))


json_lines = st.one_of(
    st.text(max_size=60),
    st.builds(lambda c, s: json.dumps({"content": c, "summary": s}, ensure_ascii=False), values, values),
    st.builds(lambda d: json.dumps(d, ensure_ascii=False), st.dictionaries(st.text(max_size=8), values, max_size=3)),
    st.builds(lambda c, s: json.dumps({"content": c, "summary": s}, ensure_ascii=False), st.text(), st.text()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(json_lines, max_size=6),
    st.sampled_from(("utf-8", "utf-8-sig", "gbk", "latin-1")),
    st.sampled_from(("\n", "\r\n")),
)
def test_any_data_file_is_read_or_refused_naming_the_file(tmp_path, lines, encoding, newline):
    path = tmp_path / "train.json"
    path.write_bytes(newline.join(lines).encode(encoding, errors="replace"))
    try:
        examples = adgen.read(path)
    except PtuneError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
    else:
        assert examples and all(isinstance(e["content"], str) and isinstance(e["summary"], str) for e in examples)
