"""BLEU-4 and ROUGE-1/2/L exactly as the ChatGLM-6B P-tuning reference computes them.

ROUGE: both texts segmented with jieba, words joined by spaces, `rouge_chinese.Rouge` F-score x100.
BLEU-4: nltk `sentence_bleu` over characters with `SmoothingFunction().method3`, x100.
Each rounded to 4 decimals per example; corpus scores are plain means over examples. Where the reference would
crash (a prediction or label that jieba leaves empty), the example scores 0 and is counted as empty.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence

import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

jieba.setLogLevel(logging.WARNING)

METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def _words(text: str) -> list[str]:
    return [w for w in jieba.cut(text) if w.strip()]


def score_one(prediction: str, label: str) -> tuple[dict[str, float], bool]:
    """Per-example scores, and whether the prediction was empty for the reference (then every score is 0)."""
    hyp, ref = _words(prediction), _words(label)
    if not hyp or not ref or not "".join(hyp).strip(" \t\n.,!?;:，。！？；：、"):
        return {name: 0.0 for name in METRIC_NAMES}, True
    try:
        rouge = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    except (ValueError, RecursionError):
        return {name: 0.0 for name in METRIC_NAMES}, True
    scores = {f"rouge-{k[-1]}": round(v["f"] * 100, 4) for k, v in rouge.items()}
    scores["bleu-4"] = round(
        sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3) * 100, 4)
    return scores, False


def corpus_scores(predictions: Sequence[str], labels: Sequence[str]) -> tuple[dict[str, float], int]:
    """Mean of per-example scores, and how many predictions were empty."""
    per_example = [score_one(p, l) for p, l in zip(predictions, labels, strict=True)]
    empty = sum(1 for _, e in per_example if e)
    if not per_example:
        return {name: 0.0 for name in METRIC_NAMES}, 0
    means = {name: round(statistics.fmean(s[name] for s, _ in per_example), 4) for name in METRIC_NAMES}
    return means, empty
