"""BLEU-4 and ROUGE-1/2/L exactly as the ChatGLM-6B P-tuning reference computes them.

Per example: ROUGE from `rouge_chinese.Rouge` on both texts segmented with jieba and joined by spaces (F-score
x100); BLEU-4 from nltk `sentence_bleu` over characters with `SmoothingFunction().method3` (x100); each rounded
to 4 decimals. Corpus score: the plain mean over examples. Where the reference crashes (rouge_chinese raises
"Hypothesis is empty" for a prediction that is empty or only whitespace), the example scores 0 on every metric
and is counted in `empty_predictions`.
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
_ZERO = dict.fromkeys(METRIC_NAMES, 0.0)


def score_one(prediction: str, label: str) -> tuple[dict[str, float], bool]:
    """Per-example scores, and whether the reference would have crashed on the prediction (scored 0)."""
    hypothesis = " ".join(jieba.cut(prediction))
    reference = " ".join(jieba.cut(label))
    try:
        rouge = Rouge().get_scores(hypothesis, reference)[0]
    except ValueError:  # "Hypothesis is empty." / "Reference is empty."
        return dict(_ZERO), True
    scores = {name: round(value["f"] * 100, 4) for name, value in rouge.items()}
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores, False


def per_example(predictions: Sequence[str], labels: Sequence[str]) -> list[tuple[dict[str, float], bool]]:
    return [score_one(pred, label) for pred, label in zip(predictions, labels, strict=True)]


def corpus_scores(predictions: Sequence[str], labels: Sequence[str]) -> tuple[dict[str, float], int]:
    """The plain mean of per-example scores (as the reference's np.mean), and how many scored 0 as empty."""
    return corpus_of(per_example(predictions, labels))


def corpus_of(scored: Sequence[tuple[dict[str, float], bool]]) -> tuple[dict[str, float], int]:
    """corpus_scores of examples scored already (per_example)."""
    if not scored:
        return dict(_ZERO), 0
    means = {name: statistics.fmean(s[name] for s, _ in scored) for name in METRIC_NAMES}
    return means, sum(1 for _, empty in scored if empty)
