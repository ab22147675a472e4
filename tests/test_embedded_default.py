"""The embedded default really learns: the out-of-the-box params, end to end (slow: about 4 minutes)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import REPO, make_project


@pytest.mark.slow
def test_default_ptuning_beats_the_base_by_10_rouge_l(tmp_path, env):
    project = make_project(tmp_path / "project", env, params=REPO / "params.yaml")
    assert yaml.safe_load((project.root / "params.yaml").read_text())["evaluate"]["max_examples"] == 100
    project.set_param("evaluate.do_sample", "false")  # the margin is judged with greedy decoding
    project.run("snakemake", "--cores", "1", "report", timeout=1500)
    metrics = json.loads((project.root / "reports/metrics.json").read_text())
    assert metrics["n_examples"] == 100
    assert metrics["ptuned"]["rouge-l"] >= metrics["base"]["rouge-l"] + 10, metrics
    report = (project.root / "reports/report.md").read_text()
    assert "data:image/png;base64," in report
    # The 5 best, the 5 worst and 10 random dev examples, each row with its content and label.
    assert len(re.findall(r"\n\| \d+ \| 类型\\#", report)) == 20
