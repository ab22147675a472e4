"""ADGEN files: the real dev split reads unchanged; a bad line is named with its file and line."""

from __future__ import annotations

import hashlib
import re

import pytest

from ptune.data import adgen, synthetic_adgen
from ptune.errors import PtuneError

from conftest import ADGEN_SAMPLE, SHARED_ADGEN


def test_reads_real_adgen_unchanged():
    examples = adgen.read(ADGEN_SAMPLE / "dev.json")
    assert len(examples) == 100
    assert examples[0]["content"].startswith("类型#上衣*材质#牛仔布")


def test_the_shipped_sample_is_the_one_its_readme_describes():
    readme = (ADGEN_SAMPLE / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([\w.-]+\.json) \| (\d+) \| ([0-9a-f]{64}) \|", readme, re.M)
    assert {name for name, _, _ in rows} == {"train.json", "dev.json"}
    for name, lines, sha256 in rows:
        data = (ADGEN_SAMPLE / name).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), data.count(b"\n")) == (sha256, int(lines)), name


def test_reads_the_whole_real_dev_split_where_the_machine_has_it():
    dev = SHARED_ADGEN / "dev.json"
    if not dev.is_file():
        pytest.skip(f"{dev} is absent (the whole dev split; the shipped sample is read by the test above)")
    examples = adgen.read(dev)
    assert len(examples) == 1070
    assert dev.read_bytes().startswith((ADGEN_SAMPLE / "dev.json").read_bytes())


def test_the_shared_sample_is_the_one_its_readme_describes():
    """The tests that read ../shared/data/adgen/ rely on these being the files its README names (lines, sha256)."""
    readme = SHARED_ADGEN / "README.md"
    if not readme.is_file():
        pytest.skip(f"{readme} is absent (the shared ADGEN sample is provided beside the repository)")
    rows = re.findall(r"^\| ([\w.-]+\.json) \| (\d+) \| ([0-9a-f]{64}) \|", readme.read_text(encoding="utf-8"), re.M)
    assert {name for name, _, _ in rows} == {"dev.json", "train-first5000.json"}
    for name, lines, sha256 in rows:
        data = (SHARED_ADGEN / name).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), data.count(b"\n")) == (sha256, int(lines)), name


def test_round_trip_is_byte_identical(tmp_path):
    dev = ADGEN_SAMPLE / "dev.json"
    out = tmp_path / "dev.json"
    adgen.write(out, adgen.read(dev))
    assert out.read_bytes() == dev.read_bytes()


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"content": "类型#上衣"', "not a JSON object"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"content": "类型#上衣"}', "'summary' is missing"),
        ('{"content": 3, "summary": "x"}', "'content' is a int"),
    ],
)
def test_bad_line_is_named(tmp_path, line, problem):
    path = tmp_path / "train.json"
    path.write_text('{"content": "类型#裙", "summary": "好看"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(PtuneError) as err:
        adgen.read(path)
    assert f"{path}:2:" in str(err.value) and problem in str(err.value)


def test_generated_data_is_adgen_shaped_and_seeded():
    a = list(synthetic_adgen.generate(5, 50))
    assert a == list(synthetic_adgen.generate(5, 50))
    assert a != list(synthetic_adgen.generate(6, 50))
    for ex in a:
        assert ex["content"].startswith("类型#")
        pairs = [kv.split("#") for kv in ex["content"].split("*")]
        assert all(len(p) == 2 for p in pairs)
        # The copy names the garment (the value of its naming key).
        assert any(v in ex["summary"] for k, v in pairs if k in ("衣样式", "裙型", "裤型"))
