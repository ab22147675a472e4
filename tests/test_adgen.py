"""ADGEN files: the real dev split reads unchanged; a bad line is named with its file and line."""

from __future__ import annotations

import pytest

from conftest import SHARED_ADGEN
from ptune import adgen, synthetic_adgen
from ptune.errors import PtuneError


def test_reads_the_real_adgen_dev_split_unchanged():
    dev = SHARED_ADGEN / "dev.json"
    if not dev.is_file():
        pytest.skip(f"{dev} is absent (the shared ADGEN sample is provided beside the repository)")
    examples = adgen.read(dev)
    assert len(examples) == 1070
    assert examples[0]["content"].startswith("类型#上衣*材质#牛仔布")


def test_round_trip_is_byte_identical(tmp_path):
    dev = SHARED_ADGEN / "dev.json"
    if not dev.is_file():
        pytest.skip(f"{dev} is absent")
    out = tmp_path / "dev.json"
    adgen.write(out, adgen.read(dev))
    assert out.read_bytes() == dev.read_bytes()


@pytest.mark.parametrize("line, problem", [
    ('{"content": "类型#上衣"', "not a JSON object"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"content": "类型#上衣"}', "'summary' is missing"),
    ('{"content": 3, "summary": "x"}', "'content' is a int"),
])
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
