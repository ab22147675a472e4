"""The general, out-of-task set (data/general.jsonl) and what evaluate and the report make of it (issue 38)."""

from __future__ import annotations

import json

import pytest
import yaml

from ptune.data import general, synthetic_adgen
from ptune.errors import PtuneError
from ptune.reporting.metrics import METRIC_NAMES


def test_embedded_general_set_is_held_out_from_the_pre_training_corpus_and_the_data_set():
    corpus = synthetic_adgen.pretraining_corpus(1234, 3000)
    held = synthetic_adgen.held_out_general(1234, 3000, 100)
    assert len(held) == 100 and len({r["prompt"] for r in held}) == 100
    seen = {ex["content"] for ex in corpus}
    assert not any(r["prompt"].rstrip("\n") in seen for r in held)
    # plain style (the base's own), never an attribute list of the ADGEN-shaped data set
    assert all(synthetic_adgen._partition(r["prompt"].rstrip("\n")) == "plain" for r in held)
    # the same corpus the embedded base is built from (model/embedded.py)
    assert [synthetic_adgen.plain_text(e) for e in corpus[:3]] == [
        synthetic_adgen.plain_text(e)
        for e in list(synthetic_adgen.generate(1234 + synthetic_adgen.CORPUS_SEED_OFFSET, 3, style="plain"))
    ]
    assert held == synthetic_adgen.held_out_general(1234, 3000, 100)  # seeded


def test_general_file_shape_is_checked():
    rows = general.parse('{"prompt": "p", "response": "r", "extra": 1}\n\n{"prompt": "", "response": "x"}\n', "f")
    assert rows == [{"prompt": "p", "response": "r"}, {"prompt": "", "response": "x"}]
    assert general.parse(general.dumps(rows), "f") == rows
    for bad in ('{"prompt": "p"}', "not json", '{"prompt": "p", "response": "  "}', "[1]"):
        with pytest.raises(PtuneError, match="line 1"):
            general.parse(bad, "f")


def test_evaluate_writes_intervals_and_the_general_set(pipeline_run):
    root = pipeline_run.root
    metrics = json.loads((root / "reports/metrics.json").read_text())
    ci = json.loads((root / "reports/intervals.json").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())["evaluate"]
    assert ci["bootstrap"]["resamples"] == params["bootstrap_resamples"]
    for model in ("base", "ptuned"):
        for k in METRIC_NAMES:
            block = ci["scores"][model][k]
            assert block["mean"] == pytest.approx(metrics[model][k], abs=1e-4)  # the flat score, unchanged
            assert block["low"] <= block["mean"] + 1e-4 and block["mean"] - 1e-4 <= block["high"]
    for k in METRIC_NAMES:
        gain = ci["scores"]["gain"][k]
        assert gain["mean"] == pytest.approx(metrics["ptuned"][k] - metrics["base"][k], abs=1e-3)
        assert gain["clear"] == (gain["low"] > 0 or gain["high"] < 0) and 0 <= gain["p_le_0"] <= 1

    rows = [json.loads(line) for line in (root / "reports/general.jsonl").read_text().splitlines()]
    assert len(rows) == params["general_examples"] == ci["general"]["n_examples"] and ci["general"]["given"]
    assert sum(r["tokens"] for r in rows) == ci["general"]["tokens"]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in general.read(root / "data/general.jsonl")][: len(rows)]
    generated = [r for r in rows if "generated" in r]
    assert len(generated) == params["general_generations"]
    loss = ci["general"]["loss"]
    nll = {m: sum(r["nll"][m] for r in rows) / ci["general"]["tokens"] for m in ("base", "ptuned")}
    assert loss["base"]["mean"] == pytest.approx(nll["base"], abs=1e-3)
    assert loss["cost"]["mean"] == pytest.approx(nll["ptuned"] - nll["base"], abs=1e-3)


def test_report_shows_intervals_verdict_and_the_cost_outside_the_task(pipeline_run):
    root = pipeline_run.root
    ci = json.loads((root / "reports/intervals.json").read_text())
    md = (root / "reports/report.md").read_text(encoding="utf-8")
    html = (root / "reports/report.html").read_text(encoding="utf-8")
    lead = ci["scores"]["gain"]["rouge-l"]
    sentence = "The gain is clear of noise" if lead["clear"] and lead["low"] > 0 else "not clear of noise"
    assert sentence in md and sentence in html
    assert f"[{lead['low']:+.2f}, {lead['high']:+.2f}]" in md
    assert "The prefix outside its task" in md and 'id="general-table"' in html
    cost = ci["general"]["loss"]["cost"]
    assert f"{cost['mean']:+.4f} [{cost['low']:+.4f}, {cost['high']:+.4f}]" in md


def test_without_a_general_set_the_report_says_so(ran_project):
    root = ran_project.root
    (root / "reports/general.jsonl").write_text("")
    ci = json.loads((root / "reports/intervals.json").read_text())
    ci["general"] = {"given": False, "n_examples": 0}
    (root / "reports/intervals.json").write_text(json.dumps(ci))
    ran_project.run("ptune", "report")
    md = (root / "reports/report.md").read_text(encoding="utf-8")
    assert "No general set was given" in md and "fetch_data.general_file" in md


def test_dvc_metrics_diff_reads_headline_numbers_and_intervals(ran_project):
    shown = json.loads(ran_project.run("dvc", "metrics", "show", "--json").stdout)[""]["data"]
    assert "ptuned" in shown["reports/metrics.json"]["data"]
    assert shown["reports/intervals.json"]["data"]["scores"]["gain"]["rouge-l"]["low"] is not None
    table = ran_project.run("dvc", "metrics", "show").stdout
    assert "ptuned.rouge-l" in table and "scores.gain.rouge-l.low" in table
