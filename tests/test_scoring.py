"""Scores of generated answers, against values computed by hand."""

from __future__ import annotations

import math

import pytest

from fedmeki_core.tasks.scoring import binary_scores, bleu1, meteor, parse_yes_no, rouge1, text_scores


def test_yes_no_parsing_reads_the_first_word() -> None:
    assert parse_yes_no("Yes, there is an opacity.") == 1
    assert parse_yes_no("  no") == 0
    assert parse_yes_no("maybe yes") is None
    assert parse_yes_no("") is None


def test_binary_scores_match_the_confusion_matrix() -> None:
    # tp=2 (a, b), fn=1 (c answered no) + 1 unparsed positive (d), tn=1 (e), fp=1 (f), 1 unparsed negative (g).
    answers = ["yes", "yes", "no", "hmm", "no", "yes", "what"]
    labels = [1, 1, 1, 1, 0, 0, 0]
    scores = binary_scores(answers, labels)
    assert scores["accuracy"] == pytest.approx(3 / 7)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    tp, tn, fp, fn = 2, 1, 2, 2
    assert scores["mcc"] == pytest.approx(
        (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    )
    assert scores["unparsed"] == pytest.approx(2 / 7)


def test_perfect_answers_score_one() -> None:
    assert binary_scores(["yes", "no"], [1, 0])["mcc"] == pytest.approx(1.0)
    scores = text_scores(["the left lung"], ["The left lung."])
    assert {name: value for name, value in scores.items() if "." not in name} == {
        "bleu1": 1.0,
        "rouge1": 1.0,
        "meteor": 1 - 0.5 * (1 / 3) ** 3,
    }


def test_bleu1_applies_the_brevity_penalty() -> None:
    assert bleu1("the cat sat", "the cat sat on the mat") == pytest.approx(math.exp(1 - 6 / 3))
    assert bleu1("the the the", "the cat") == pytest.approx(1 / 3)  # clipped counts


def test_rouge1_is_unigram_f1() -> None:
    assert rouge1("left lung opacity", "opacity in the left lung") == pytest.approx(2 * 1 * 0.6 / 1.6)
    assert rouge1("none", "baseline drift") == 0.0


def test_meteor_penalises_fragmentation() -> None:
    # 2 matches in 2 chunks: P = 1, R = 2/3, Fmean = P R / (0.9 P + 0.1 R), penalty 0.5 (2/2)^3.
    p, r = 1.0, 2 / 3
    expected = p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * 1.0)
    assert meteor("lung left", "left big lung") == pytest.approx(expected)
