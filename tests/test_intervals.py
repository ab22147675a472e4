"""The bootstrap behind reports/intervals.json, checked against computations that share none of its code: an exact
enumeration of every resample (small n), and a plain-Python second implementation on the same resampled indices."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest

from ptune.reporting import intervals
from ptune.reporting.metrics import METRIC_NAMES


def _quantile(sorted_values: list[float], q: float) -> float:
    """numpy's default ("linear") quantile, by hand."""
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _scores(n: int, seed: int, shift: float) -> dict[str, list[float]]:
    rng = random.Random(seed)
    return {m: [round(max(0.0, rng.gauss(30 + shift, 12)), 4) for _ in range(n)] for m in METRIC_NAMES}


def test_second_implementation_on_the_same_indices():
    """Plain Python loops over the same index rows give the same means, bounds, p(≤0) and verdicts."""
    base, tuned = _scores(40, 1, 0.0), _scores(40, 2, 4.0)
    got = intervals.score_intervals({"base": base, "ptuned": tuned}, resamples=300, confidence=0.9, seed=5)
    idx = intervals.resample_indices(40, 300, 5).tolist()
    for metric in METRIC_NAMES:
        diffs = [t - b for t, b in zip(tuned[metric], base[metric])]
        for name, values in (("base", base[metric]), ("ptuned", tuned[metric]), ("gain", diffs)):
            stats = sorted(sum(values[i] for i in row) / len(row) for row in idx)
            want = {
                "mean": round(sum(values) / len(values), 4),
                "low": round(_quantile(stats, 0.05), 4),
                "high": round(_quantile(stats, 0.95), 4),
            }
            if name == "gain":
                want["p_le_0"] = round(sum(1 for s in stats if s <= 0) / len(stats), 4)
                want["clear"] = want["low"] > 0 or want["high"] < 0
            assert got[name][metric] == pytest.approx(want, abs=1e-4), (name, metric)


def _exact_quantile(values: list[float], q: float) -> float:
    """The q-quantile of the exact bootstrap distribution of the mean: every one of the n^n resamples, equally
    likely."""
    n = len(values)
    means = sorted(sum(values[i] for i in row) / n for row in itertools.product(range(n), repeat=n))
    return _quantile(means, q)


def test_matches_the_exact_bootstrap_distribution():
    """n = 5: all 3,125 resamples enumerated; 40,000 random resamples land within a small distance of the exact
    2.5 % and 97.5 % quantiles, and the paired gain's interval is the exact one of the differences."""
    base = {m: [10.0, 20.0, 0.0, 35.0, 15.0] for m in METRIC_NAMES}
    tuned = {m: [14.0, 21.0, 9.0, 30.0, 26.0] for m in METRIC_NAMES}
    got = intervals.score_intervals({"base": base, "ptuned": tuned}, resamples=40_000, confidence=0.95, seed=0)
    diffs = [4.0, 1.0, 9.0, -5.0, 11.0]
    for name, values in (("base", base["rouge-l"]), ("ptuned", tuned["rouge-l"]), ("gain", diffs)):
        assert got[name]["rouge-l"]["mean"] == pytest.approx(sum(values) / 5)
        assert got[name]["rouge-l"]["low"] == pytest.approx(_exact_quantile(values, 0.025), abs=0.6)
        assert got[name]["rouge-l"]["high"] == pytest.approx(_exact_quantile(values, 0.975), abs=0.6)
    # p(gain ≤ 0), exactly: the share of the 3,125 resamples whose mean difference is ≤ 0.
    exact = sum(1 for row in itertools.product(range(5), repeat=5) if sum(diffs[i] for i in row) <= 0) / 5**5
    assert got["gain"]["rouge-l"]["p_le_0"] == pytest.approx(exact, abs=0.01)


def test_hand_computed_cases():
    """Constant scores: a zero-width interval; a constant gain of +2: clear of noise, p = 0; identical models: a
    gain of exactly 0 in every resample, so p = 1 and not clear."""
    same = {m: [5.0] * 7 for m in METRIC_NAMES}
    up = {m: [7.0] * 7 for m in METRIC_NAMES}
    got = intervals.score_intervals({"base": same, "ptuned": up}, resamples=50, confidence=0.95, seed=1)
    assert got["base"]["bleu-4"] == {"mean": 5.0, "low": 5.0, "high": 5.0}
    assert got["gain"]["bleu-4"] == {"mean": 2.0, "low": 2.0, "high": 2.0, "p_le_0": 0.0, "clear": True}
    flat = intervals.score_intervals({"base": same, "ptuned": same}, resamples=50, confidence=0.95, seed=1)
    assert flat["gain"]["rouge-1"]["p_le_0"] == 1.0 and flat["gain"]["rouge-1"]["clear"] is False


def test_seeded_and_byte_identical():
    base, tuned = _scores(30, 3, 0.0), _scores(30, 4, 1.0)
    one = json.dumps(intervals.score_intervals({"base": base, "ptuned": tuned}, 1000, 0.95, 11), sort_keys=True)
    two = json.dumps(intervals.score_intervals({"base": base, "ptuned": tuned}, 1000, 0.95, 11), sort_keys=True)
    other = json.dumps(intervals.score_intervals({"base": base, "ptuned": tuned}, 1000, 0.95, 12), sort_keys=True)
    assert one == two and one != other


def test_loss_intervals_are_token_weighted_ratios():
    """The general set's loss is sum(NLL) / sum(tokens) in each resample (checked by hand on the same indices);
    the cost is the paired difference, the perplexity ratio its exponential."""
    rng = random.Random(9)
    tokens = [rng.randint(5, 40) for _ in range(25)]
    base = [t * rng.uniform(1.5, 2.5) for t in tokens]
    tuned = [b + t * rng.uniform(-0.1, 0.4) for b, t in zip(base, tokens)]
    got = intervals.loss_intervals({"base": base, "ptuned": tuned}, tokens, 400, 0.95, 3)
    idx = intervals.resample_indices(25, 400, 3).tolist()
    costs = sorted(
        (sum(tuned[i] for i in row) - sum(base[i] for i in row)) / sum(tokens[i] for i in row) for row in idx
    )
    cost = (sum(tuned) - sum(base)) / sum(tokens)
    assert got["loss"]["cost"]["mean"] == pytest.approx(round(cost, 4))
    assert got["loss"]["cost"]["low"] == pytest.approx(_quantile(costs, 0.025), abs=1e-4)
    assert got["loss"]["cost"]["high"] == pytest.approx(_quantile(costs, 0.975), abs=1e-4)
    assert got["perplexity"]["base"]["mean"] == pytest.approx(math.exp(sum(base) / sum(tokens)), abs=1e-3)
    assert got["perplexity"]["ratio"]["mean"] == pytest.approx(math.exp(cost), abs=1e-4)
    assert got["tokens"] == sum(tokens) and got["n_examples"] == 25
    assert intervals.loss_intervals({"base": [], "ptuned": []}, [], 10, 0.95, 0) == {}
    assert np.isfinite(got["perplexity"]["ptuned"]["high"])
