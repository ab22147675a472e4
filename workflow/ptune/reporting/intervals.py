"""Confidence intervals by bootstrap over examples: reports/intervals.json beside the flat reports/metrics.json.

Every score in metrics.json is a mean of per-example scores, so resampling the examples (with replacement, as
many as there are) and taking the mean again costs little. The method: the percentile bootstrap. One matrix of
resampled indices (`resamples` x n, numpy's PCG64 seeded with the evaluate seed) serves every metric and both
models, so the gain (P-tuned − base) is a *paired* bootstrap: each resample takes the same examples for both
models, which is what makes a small but consistent gain visible. The interval is the (1−c)/2 and (1+c)/2
quantiles of the resampled statistic (numpy's default linear interpolation); `p_le_0` is the share of resamples
in which the gain is ≤ 0 (a one-sided bootstrap p-value of "no gain"); the gain is "clear of noise" when its
interval excludes 0.

Ratio statistics (the general set's token-weighted loss: the sum of NLLs over the sum of tokens) resample
examples likewise and take the ratio of the resampled sums.

Same seed, same scores, same numpy: the same bytes. Values are rounded to 4 decimals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .metrics import METRIC_NAMES

METHOD = "percentile bootstrap over examples, paired between models (same resampled examples)"
DIGITS = 4
# The index matrix is seeded with the evaluate seed shifted by this, so that it never shares a stream with
# generation (seeded seed + batch index).
SEED_OFFSET = 100_003


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """`resamples` rows of n indices drawn with replacement from range(n)."""
    rng = np.random.Generator(np.random.PCG64(seed + SEED_OFFSET))
    return rng.integers(0, n, size=(resamples, n), dtype=np.int64)


def _round(x: float) -> float:
    return round(float(x), DIGITS)


def _bounds(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return float(low), float(high)


def interval(point: float, stats: np.ndarray, confidence: float) -> dict:
    """{mean, low, high}: the statistic on the examples themselves and its bootstrap interval."""
    low, high = _bounds(stats, confidence)
    return {"mean": _round(point), "low": _round(low), "high": _round(high)}


def difference(point: float, stats: np.ndarray, confidence: float) -> dict:
    """A paired difference's interval, the share of resamples ≤ 0, and whether the interval excludes 0."""
    out = interval(point, stats, confidence)
    out["p_le_0"] = _round(np.mean(stats <= 0.0))
    out["clear"] = bool(out["low"] > 0 or out["high"] < 0)
    return out


def resampled_means(values: Sequence[float], idx: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)[idx].mean(axis=1)


def score_intervals(
    per_example: Mapping[str, Mapping[str, Sequence[float]]], resamples: int, confidence: float, seed: int
) -> dict:
    """`per_example[model][metric]` -> per-example scores (base and ptuned, dev-set order). Returns
    {"base": {metric: {mean, low, high}}, "ptuned": ..., "gain": {metric: {mean, low, high, p_le_0, clear}}}."""
    n = len(per_example["base"][METRIC_NAMES[0]])
    out: dict = {"base": {}, "ptuned": {}, "gain": {}}
    if n == 0:
        return out
    idx = resample_indices(n, resamples, seed)
    for metric in METRIC_NAMES:
        base = np.asarray(per_example["base"][metric], dtype=np.float64)
        tuned = np.asarray(per_example["ptuned"][metric], dtype=np.float64)
        for name, values in (("base", base), ("ptuned", tuned)):
            out[name][metric] = interval(values.mean(), resampled_means(values, idx), confidence)
        out["gain"][metric] = difference((tuned - base).mean(), resampled_means(tuned - base, idx), confidence)
    return out


def loss_intervals(
    nll: Mapping[str, Sequence[float]], tokens: Sequence[int], resamples: int, confidence: float, seed: int
) -> dict:
    """The general set's teacher-forced loss (token-weighted mean NLL, nats per token) and perplexity, with the
    prefix off ("base") and on ("ptuned"), and the prefix's cost (ptuned − base; > 0: the prefix makes the text
    less likely). `nll[model]` is each example's summed NLL, `tokens` each example's scored tokens."""
    n = len(tokens)
    if n == 0 or sum(tokens) == 0:
        return {}
    idx = resample_indices(n, resamples, seed)
    tok = np.asarray(tokens, dtype=np.float64)
    tok_sums = tok[idx].sum(axis=1)
    loss, ppl, stats = {}, {}, {}
    for name in ("base", "ptuned"):
        values = np.asarray(nll[name], dtype=np.float64)
        stats[name] = values[idx].sum(axis=1) / tok_sums
        point = values.sum() / tok.sum()
        loss[name] = interval(point, stats[name], confidence)
        ppl[name] = interval(math.exp(point), np.exp(stats[name]), confidence)
    cost = (np.sum(nll["ptuned"]) - np.sum(nll["base"])) / tok.sum()
    loss["cost"] = difference(cost, stats["ptuned"] - stats["base"], confidence)
    # Perplexity with the prefix over perplexity without: 1.10 = the prefix makes the text 10 % more perplexing.
    ppl["ratio"] = interval(math.exp(cost), np.exp(stats["ptuned"] - stats["base"]), confidence)
    return {"n_examples": n, "tokens": int(tok.sum()), "loss": loss, "perplexity": ppl}


def settings(resamples: int, confidence: float, seed: int) -> dict:
    return {"method": METHOD, "resamples": resamples, "confidence": confidence, "seed": seed + SEED_OFFSET}
