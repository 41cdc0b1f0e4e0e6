"""Evaluation figures with their counts and intervals: Wilson against published values, rank AUC with ties, the
seeded bootstrap, calibration, and how the report pools the silos' figures."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedmeki_core.pooling import pooled, reliability_bins, scheme_keys
from fedmeki_core.tasks.confidence import (
    BOOTSTRAP_RESAMPLES,
    binary_metrics,
    bootstrap_auc_interval,
    calibration_metrics,
    expected_calibration_error,
    reliability_table,
    roc_auc,
    wilson_interval,
)
from fedmeki_core.tasks.metrics import classification_metrics
from silo_agent.trainer import _personal_metric


@pytest.mark.parametrize(
    ("successes", "n", "lo", "hi"),
    [
        # Newcombe RG (1998), "Two-sided confidence intervals for the single proportion: comparison of seven
        # methods", Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score, no continuity correction).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe_1998(successes: int, n: int, lo: float, hi: float) -> None:
    assert wilson_interval(successes, n) == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_is_symmetric_and_bounded() -> None:
    lo, hi = wilson_interval(20, 29)
    assert wilson_interval(9, 29) == pytest.approx((1 - hi, 1 - lo))
    assert wilson_interval(29, 29)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(24, 24) == pytest.approx((0.86202, 1.0), abs=1e-5)  # 24 of 24 is not a bare 1.000
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)


def test_auc_by_ranks_with_ties_by_hand() -> None:
    # Positives 0.8, 0.5, 0.5; negatives 0.5, 0.2. Of the 6 pairs, the positive scores higher in 4 (0.8 > 0.5,
    # 0.8 > 0.2, 0.5 > 0.2 twice) and ties in 2 (0.5 = 0.5 twice): AUC = (4 + 2 / 2) / 6 = 5 / 6.
    scores = np.array([0.8, 0.5, 0.5, 0.5, 0.2])
    labels = np.array([1, 1, 1, 0, 0])
    assert roc_auc(scores, labels) == pytest.approx(5 / 6)
    assert roc_auc(np.array([0.3, 0.3]), np.array([1, 0])) == 0.5  # all tied: chance
    assert roc_auc(scores, np.ones(5)) is None  # one class only: undefined


def test_auc_by_ranks_equals_the_pairwise_count() -> None:
    rng = np.random.default_rng(3)
    scores, labels = rng.integers(0, 6, 60) / 5, rng.integers(0, 2, 60)  # many ties
    pairs = [
        1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(scores[labels == 1], scores[labels == 0])
    ]
    assert roc_auc(scores, labels) == pytest.approx(np.mean(pairs))


def test_the_bootstrap_interval_holds_the_estimate_and_repeats_with_its_seed() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.4 * labels, 2)
    auc = roc_auc(scores, labels)
    interval = bootstrap_auc_interval(scores, labels)
    assert interval is not None and auc is not None
    assert interval[0] < auc < interval[1] and interval[1] - interval[0] < 0.3
    assert bootstrap_auc_interval(scores, labels) == interval
    assert bootstrap_auc_interval(scores, labels, seed=1) != interval
    assert BOOTSTRAP_RESAMPLES == 1000  # the count the researcher guide states
    assert bootstrap_auc_interval(scores, np.zeros(200)) is None


def test_a_perfectly_calibrated_model_has_zero_ece() -> None:
    # 100 samples at each bin's centre 0.05, 0.15, ..., 0.95, of which exactly that share is positive.
    probabilities = np.repeat(np.arange(10) / 10 + 0.05, 100)
    labels = np.concatenate([np.arange(100) < round(100 * p) for p in np.arange(10) / 10 + 0.05]).astype(int)
    table = reliability_table(probabilities, labels)
    assert [count for count, _, _ in table] == [100] * 10
    assert [positives for _, positives, _ in table] == [5, 15, 25, 35, 45, 55, 65, 75, 85, 95]
    assert expected_calibration_error(table) == pytest.approx(0.0, abs=1e-12)


def test_an_overconfident_model_has_the_gap_as_ece() -> None:
    table = reliability_table(np.full(40, 0.9), np.arange(40) % 2)  # says 90%, is right half the time
    assert expected_calibration_error(table) == pytest.approx(0.4)
    assert reliability_table(np.array([1.0]), np.array([1]))[-1] == (1, 1, 1.0)  # the last bin holds 1.0
    metrics = calibration_metrics(table, with_table=True)
    assert metrics["ece.n"] == 40 and reliability_bins(metrics, "") == [(9, 40, 20, pytest.approx(0.9))]


def test_binary_figures_come_from_the_confusion_matrix_at_the_threshold() -> None:
    # P(positive) of 6 positives and 4 negatives: 4 positives above 0.5 (TP), 3 negatives at or below it (TN).
    probabilities = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.2, 0.7, 0.5, 0.3, 0.1])
    labels = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    metrics = binary_metrics(probabilities, labels)
    assert (metrics["sensitivity"], metrics["sensitivity.n"]) == (4 / 6, 6)
    assert (metrics["specificity"], metrics["specificity.n"]) == (3 / 4, 4)
    assert (metrics["accuracy"], metrics["accuracy.n"]) == (7 / 10, 10)
    assert (metrics["accuracy.lo"], metrics["accuracy.hi"]) == wilson_interval(7, 10)
    assert metrics["auc"] == roc_auc(probabilities, labels) and metrics["auc.n"] == 10
    assert metrics["auc.lo"] <= metrics["auc"] <= metrics["auc.hi"]


def test_classification_metrics_of_a_binary_task_agree_with_their_probabilities() -> None:
    rng = np.random.default_rng(5)
    logits, labels = rng.normal(size=(64, 2)), rng.integers(0, 2, 64)
    metrics = classification_metrics(logits, labels, binary=True)
    assert metrics["accuracy"] == float((logits.argmax(axis=1) == labels).mean())
    assert metrics["accuracy.n"] == 64 and "ece" in metrics and "calibration.0.n" not in metrics
    assert "auc" not in classification_metrics(logits, labels)  # not binary: accuracy, its interval, loss, F1
    assert set(classification_metrics(logits, labels)) == {
        "loss",
        "f1",
        "accuracy",
        "accuracy.n",
        "accuracy.lo",
        "accuracy.hi",
    }


def test_pooling_adds_the_silos_counts_and_keeps_auc_per_silo() -> None:
    a = binary_metrics(np.array([0.9, 0.8, 0.3, 0.2, 0.6]), np.array([1, 0, 0, 0, 1]), with_table=True)
    b = binary_metrics(np.array([0.1, 0.7, 0.4]), np.array([1, 1, 0]), with_table=True)
    silos = [{f"eval_{key}": value for key, value in metrics.items()} for metrics in (a, b)]
    pooled_metrics = pooled(silos)
    correct = round(a["accuracy"] * 5) + round(b["accuracy"] * 3)
    assert (pooled_metrics["eval_accuracy"], pooled_metrics["eval_accuracy.n"]) == (correct / 8, 8)
    assert (pooled_metrics["eval_accuracy.lo"], pooled_metrics["eval_accuracy.hi"]) == wilson_interval(correct, 8)
    assert pooled_metrics["eval_sensitivity.n"] == 4 and pooled_metrics["eval_specificity.n"] == 4
    assert not any(key.startswith("eval_auc") for key in pooled_metrics)  # per silo only
    everyone = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.7, 0.4]), np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert pooled_metrics["eval_ece"] == pytest.approx(binary_metrics(*everyone)["ece"])  # the pooled data's own
    assert scheme_keys(set(silos[0]) | {"eval_loss", "train_loss"}) == set(silos[0]) - {"eval_loss", "eval_f1"}


def test_without_tables_the_pooled_ece_is_the_weighted_mean() -> None:
    silos = [{"eval_ece": 0.1, "eval_ece.n": 30.0}, {"eval_ece": 0.4, "eval_ece.n": 10.0}]
    assert pooled(silos) == {"eval_ece": pytest.approx(0.175), "eval_ece.n": 40.0}


def test_personal_figures_keep_their_suffixes() -> None:
    assert _personal_metric("eval_accuracy.lo") == "personal_eval_accuracy.lo"
    assert _personal_metric("lung-opacity.eval_auc.n") == "lung-opacity.personal_eval_auc.n"
