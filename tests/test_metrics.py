"""BLEU-4 / ROUGE exactly as the reference computes them (jieba + rouge-chinese, characters + nltk method3)."""

from __future__ import annotations

import json
import random

import pytest

from ptune.reporting.metrics import corpus_scores, score_one

from conftest import ADGEN_SAMPLE


def test_identical_text_scores_100():
    scores, empty = score_one("简约而不简单的牛仔外套", "简约而不简单的牛仔外套")
    assert not empty and scores == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}


def test_partial_overlap_hand_worked():
    # jieba: 白色 / 的 / 外套 vs 白色 / 的 / 衬衫. Unigrams: 2 of 3 match, P = R = F = 2/3.
    # Bigrams: (白色 的) matches, (的 外套) does not: F = 1/2. LCS = 2 words: F = 2/3.
    scores, empty = score_one("白色的外套", "白色的衬衫")
    assert not empty
    assert scores["rouge-1"] == pytest.approx(66.6667, abs=1e-4)
    assert scores["rouge-2"] == pytest.approx(50.0, abs=1e-4)
    assert scores["rouge-l"] == pytest.approx(66.6667, abs=1e-4)
    # BLEU-4 over characters, equal lengths (no brevity penalty): n-gram precisions 3/5, 2/4, 1/3 and 0/2;
    # method3 replaces the first zero precision by 1 / (2 * 2 four-grams) = 1/4.
    assert scores["bleu-4"] == pytest.approx(round((3 / 5 * 2 / 4 * 1 / 3 * 1 / 4) ** 0.25 * 100, 4), abs=1e-4)


@pytest.mark.parametrize("prediction", ["", " ", "\n", "\t  "])
def test_where_the_reference_crashes_the_example_scores_zero_and_is_counted(prediction):
    scores, empty = score_one(prediction, "白色外套")
    assert empty and set(scores.values()) == {0.0}


def test_punctuation_only_is_scored_not_crashed():
    scores, empty = score_one("，。", "白色外套")
    assert not empty and scores["rouge-l"] == 0.0


def test_corpus_score_is_the_plain_mean():
    means, empty = corpus_scores(["", "白色的外套", "白色的衬衫"], ["白色的衬衫"] * 3)
    assert empty == 1
    assert means["rouge-1"] == pytest.approx((0 + 66.6667 + 100) / 3, abs=1e-4)


def _adgen_labels(n: int) -> list[str]:
    lines = (ADGEN_SAMPLE / "dev.json").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line)["summary"] for line in lines]


def test_real_adgen_labels_against_themselves_score_100():
    labels = _adgen_labels(50)
    means, empty = corpus_scores(labels, labels)
    assert empty == 0
    assert means["rouge-1"] == means["rouge-2"] == means["rouge-l"] == 100.0
    assert means["bleu-4"] == 100.0


def test_real_adgen_labels_shuffled_score_low():
    labels = _adgen_labels(50)
    shuffled = labels[1:] + labels[:1]
    random.Random(0).shuffle(shuffled)
    means, _ = corpus_scores(shuffled, labels)
    assert means["rouge-l"] < 30 and means["bleu-4"] < 15
