"""`ptune seeds`: K training seeds as DVC experiments, and `ptune compare`'s spread across them (issue 38)."""

from __future__ import annotations

import json
import statistics

import pytest

from ptune.reporting import compare


def _row(name: str, seed: int, lr: float, rouge_l: float, low: float, high: float) -> dict:
    row = {"Experiment": name, "rev": name[:7], "typ": "branch_commit", "State": "Success"}
    row |= {"train.seed": float(seed), "train.learning_rate": lr, "evaluate.seed": 11.0}
    row |= {f"ptuned.{m}": rouge_l - 1 for m in ("bleu-4", "rouge-1", "rouge-2")}
    row |= {"ptuned.rouge-l": rouge_l, "base.rouge-l": 10.0}
    row |= {"scores.ptuned.rouge-l.low": low, "scores.ptuned.rouge-l.high": high}
    return row


def test_spread_groups_runs_that_differ_only_in_the_seed():
    rows = [
        _row("seed-7", 7, 0.02, 30.0, 27.0, 33.0),
        _row("seed-8", 8, 0.02, 32.0, 29.5, 34.5),
        _row("seed-9", 9, 0.02, 34.5, 31.0, 37.0),
        _row("lr-0.05", 7, 0.05, 20.0, 18.0, 22.0),  # alone in its group: no spread
    ]
    frame = compare.spread(rows)
    assert list(frame.index) == ["train.learning_rate=0.02"]
    line = frame.loc["train.learning_rate=0.02"]
    assert line["n"] == 3 and line["seeds"] == "7 8 9"
    assert line["ptuned.rouge-l mean"] == pytest.approx(statistics.fmean([30.0, 32.0, 34.5]))
    assert line["ptuned.rouge-l sd"] == pytest.approx(statistics.stdev([30.0, 32.0, 34.5]))
    assert line["ptuned.rouge-l min–max"] == "30.00–34.50"
    table = compare.table(rows)
    assert list(table["ptuned.rouge-l interval"]) == [
        "[27.00, 33.00]",
        "[29.50, 34.50]",
        "[31.00, 37.00]",
        "[18.00, 22.00]",
    ]
    # exp_show names a column with its file first where two metrics files share the key
    assert (
        compare.interval_text(
            {
                "reports/intervals.json:scores.ptuned.rouge-l.low": 1.0,
                "reports/intervals.json:scores.ptuned.rouge-l.high": 2.0,
            }
        )
        == "[1.00, 2.00]"
    )
    assert compare.spread(rows[3:]) is None


def test_seed_values_start_at_params_seed(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  seed: 7\n")
    assert compare.seed_values(3, None, tmp_path / "params.yaml") == [7, 8, 9]
    assert compare.seed_values(2, 40, tmp_path / "params.yaml") == [40, 41]


@pytest.mark.slow
def test_seeds_run_as_queued_experiments_and_compare_shows_their_spread(ran_project):
    """The documented command: queued experiments, each the whole pipeline in its own workspace; train and what
    follows rerun per seed, the rest restored from the cache."""
    ran_project.run("git", "add", "-A")
    ran_project.run("git", "commit", "-q", "-m", "pipeline run")
    out = ran_project.run("ptune", "seeds", "-k", "2", timeout=1500).stdout
    assert "seed-7" in out and "seed-8" in out
    shown = json.loads(ran_project.run("dvc", "exp", "show", "--json").stdout)
    exps = {
        rev["name"]: rev["data"]
        for baseline in shown
        for exp in baseline.get("experiments") or []
        for rev in exp["revs"]
    }
    assert {"seed-7", "seed-8"} <= set(exps)
    for name, seed in (("seed-7", 7), ("seed-8", 8)):
        assert exps[name]["params"]["params.yaml"]["data"]["train"]["seed"] == seed
        assert "scores" in exps[name]["metrics"]["reports/intervals.json"]["data"]
    text = ran_project.run("ptune", "compare", "seed-7", "seed-8").stdout
    assert "Spread across training seeds" in text and "ptuned.rouge-l interval" in text
    assert "Spread across training seeds" in (ran_project.root / "reports/compare.html").read_text()
