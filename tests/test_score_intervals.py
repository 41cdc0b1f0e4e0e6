"""Counts and 95% intervals of the instruction and segmentation scores: Wilson for multiple-choice accuracy, a
bootstrap over items for exact match, BLEU-1, ROUGE-1, METEOR and over images for Dice, pooled across silos."""

from __future__ import annotations

import numpy as np
import pytest

from fedmeki_core.pooling import pooled
from fedmeki_core.tasks.confidence import bootstrap_mean, wilson_interval
from fedmeki_core.tasks.scoring import bleu1, instruction_scores, text_scores
from fedmeki_core.tasks.segmentation import segmentation_metrics

_REFERENCES = ["the left lung is clear", "no effusion", "cardiomegaly", "a small nodule in the right apex"] * 10
_ANSWERS = ["the left lung", "no effusion seen", "normal heart", "a nodule at the right apex"] * 10


def test_multiple_choice_accuracy_has_a_wilson_interval_and_its_count() -> None:
    scores = instruction_scores(["B) insulin", "a", "answer: c"], ["B", "C", "C"])
    assert scores["choice_accuracy"] == pytest.approx(2 / 3) and scores["choice_accuracy.n"] == 3
    assert (scores["choice_accuracy.lo"], scores["choice_accuracy.hi"]) == wilson_interval(2, 3)
    assert scores["exact_match"] == 0.0 and scores["exact_match.n"] == 3


def test_text_scores_carry_their_count_and_a_seeded_bootstrap_interval_over_the_answers() -> None:
    scores = text_scores(_ANSWERS, _REFERENCES)
    per_answer = [bleu1(a, r) for a, r in zip(_ANSWERS, _REFERENCES, strict=True)]
    assert scores["bleu1"] == pytest.approx(np.mean(per_answer))
    for name in ("bleu1", "rouge1", "meteor"):
        assert scores[f"{name}.n"] == 40 and scores[f"{name}.lo"] < scores[name] < scores[f"{name}.hi"]
    assert text_scores(_ANSWERS, _REFERENCES) == scores  # the same seed, the same interval
    fewer = text_scores(_ANSWERS[:8], _REFERENCES[:8])
    assert fewer["bleu1.hi"] - fewer["bleu1.lo"] > scores["bleu1.hi"] - scores["bleu1.lo"]  # fewer items, wider
    assert bootstrap_mean("x", np.ones(5)) == {"x": 1.0, "x.n": 5.0, "x.lo": 1.0, "x.hi": 1.0}
    assert bootstrap_mean("x", np.zeros(0)) == {"x": 0.0}


def test_dice_has_its_image_count_and_a_bootstrap_interval_over_images() -> None:
    masks = np.zeros((6, 4, 4), dtype=np.uint8)
    masks[:, :2, :2] = 1
    logits = np.full((6, 1, 4, 4), -5.0)
    logits[:3, 0, :2, :2] = 5.0  # the first three images segmented exactly, the last three missed
    metrics = segmentation_metrics(logits, masks)
    assert metrics["dice"] == 0.5 and metrics["dice.n"] == 6
    assert 0.0 <= metrics["dice.lo"] < 0.5 < metrics["dice.hi"] <= 1.0


def test_silos_text_scores_pool_as_the_held_out_weighted_mean() -> None:
    halves = [text_scores(_ANSWERS[:10], _REFERENCES[:10]), text_scores(_ANSWERS[10:], _REFERENCES[10:])]
    together = pooled([{f"eval_{k}": v for k, v in half.items()} for half in halves])
    assert together["eval_rouge1"] == pytest.approx(text_scores(_ANSWERS, _REFERENCES)["rouge1"])
    assert together["eval_rouge1.n"] == 40
