"""BLEU-4 / ROUGE as the reference computes them (jieba + rouge-chinese, characters + nltk method3)."""

from __future__ import annotations

from ptune.metrics import corpus_scores, score_one


def test_identical_text_scores_100():
    scores, empty = score_one("简约而不简单的牛仔外套", "简约而不简单的牛仔外套")
    assert not empty and scores == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}


def test_empty_prediction_scores_zero_and_is_counted():
    means, empty = corpus_scores(["", "，。", "白色外套"], ["白色外套", "白色外套", "白色外套"])
    assert empty == 2
    assert means["rouge-1"] == round(100 / 3, 4)


def test_partial_overlap_hand_worked():
    # jieba: 白色 / 的 / 外套 vs 白色 / 的 / 衬衫: unigram P = R = 2/3, F = 2/3.
    scores, _ = score_one("白色的外套", "白色的衬衫")
    assert abs(scores["rouge-1"] - 66.6667) < 1e-3
