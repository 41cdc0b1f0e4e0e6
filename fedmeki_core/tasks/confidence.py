"""Figures a clinician can weigh: Wilson intervals for proportions, rank AUC with a seeded bootstrap interval, means
of per-item scores (text scores, Dice) with a seeded bootstrap interval over the items,
sensitivity and specificity at the decision threshold, and calibration (ECE over fixed bins, the reliability table).

Every figure travels as named floats (the metric naming scheme, part of the wire contract): `X` is the figure,
`X.n` the number of held-out samples it was computed on, `X.lo` and `X.hi` its 95% interval. A reliability bin
k (predicted probability in [k/10, (k+1)/10), the last bin closed) is `calibration.k.n`, `calibration.k.positives`
and `calibration.k.predicted` (its mean predicted probability); only bins holding samples are sent.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

N, LO, HI = ".n", ".lo", ".hi"
PROPORTIONS = ("accuracy", "sensitivity", "specificity")  # intervals by Wilson, poolable from (value x n, n)
BOOTSTRAPPED = ("auc",)  # intervals by bootstrap, not poolable across silos
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
THRESHOLD = 0.5  # the decision threshold on P(positive); argmax of two classes decides the same
CALIBRATION_BINS = 10
CALIBRATION = "calibration"

Array = np.ndarray[Any, Any]


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of successes/n (Wilson 1927; Newcombe 1998, method 3); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(name: str, successes: int, n: int) -> dict[str, float]:
    """`name`, `name.n`, `name.lo`, `name.hi` of successes/n; nothing when n is 0 (the figure is undefined)."""
    if n <= 0:
        return {}
    lo, hi = wilson_interval(successes, n)
    return {name: successes / n, name + N: float(n), name + LO: lo, name + HI: hi}


def bootstrap_mean(
    name: str, values: Array, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, float]:
    """`name`, `name.n`, `name.lo`, `name.hi` of the mean of per-item scores (BLEU-1 of each answer, Dice of each
    image), the interval the 2.5th and 97.5th percentiles of the mean over `resamples` bootstrap resamples of the
    items, deterministic for a seed; `name` 0.0 alone when there is no item (as the scores were before counts)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    n = len(values)
    if n == 0:
        return {name: 0.0}
    rng = np.random.default_rng(seed)
    means = [
        values[rng.integers(0, n, (min(_CHUNK, resamples - start), n))].mean(axis=1)
        for start in range(0, resamples, _CHUNK)
    ]
    lo, hi = np.percentile(np.concatenate(means), [2.5, 97.5])
    return {name: float(values.mean()), name + N: float(n), name + LO: float(lo), name + HI: float(hi)}


def successes_of(value: float, n: float) -> int:
    """The count behind a proportion sent as (value, n): exact, since value is successes / n in float64."""
    return round(value * n)


def average_ranks(values: Array) -> Array:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # how many values are smaller than each distinct value
    return (first + (counts + 1) / 2.0)[inverse.reshape(-1)]


def roc_auc(scores: Array, labels: Array) -> float | None:
    """Area under the ROC curve by ranks (the Mann-Whitney U over n_pos * n_neg; a tie counts one half);
    None when one class is absent."""
    positive = np.asarray(labels) == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_auc_interval(
    scores: Array, labels: Array, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float] | None:
    """The 2.5th and 97.5th percentiles of the AUC over `resamples` stratified bootstrap resamples (positives and
    negatives each drawn with replacement to their own count, so every resample has both); None when one class is
    absent. Deterministic for a seed.

    Each resample's AUC is the same Mann-Whitney count as `roc_auc`, from how often it drew each distinct score:
    sum over scores s of positives(s) x (negatives below s + negatives(s) / 2), over n_pos x n_neg."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(labels) == 1
    distinct = np.unique(scores)
    pos, neg = np.searchsorted(distinct, scores[positive]), np.searchsorted(distinct, scores[~positive])
    if len(pos) == 0 or len(neg) == 0:
        return None
    rng = np.random.default_rng(seed)
    aucs = []
    for start in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - start)
        pos_counts = _row_counts(pos[rng.integers(0, len(pos), (rows, len(pos)))], len(distinct))
        neg_counts = _row_counts(neg[rng.integers(0, len(neg), (rows, len(neg)))], len(distinct))
        below = np.cumsum(neg_counts, axis=1) - neg_counts
        aucs.append((pos_counts * (below + neg_counts / 2.0)).sum(axis=1) / (len(pos) * len(neg)))
    lo, hi = np.percentile(np.concatenate(aucs), [2.5, 97.5])
    return float(lo), float(hi)


_CHUNK = 50  # resamples drawn at once: memory stays O(_CHUNK x samples)


def _row_counts(ids: Array, size: int) -> Array:
    """Per row of `ids`, how often each of 0 .. size - 1 occurs in it."""
    offsets = (np.arange(len(ids)) * size)[:, None]
    return np.bincount((ids + offsets).ravel(), minlength=len(ids) * size).reshape(len(ids), size)


def reliability_table(
    probabilities: Array, labels: Array, bins: int = CALIBRATION_BINS
) -> list[tuple[int, int, float]]:
    """(samples, positives, mean predicted probability) of each of `bins` equal-width bins of P(positive)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    index = np.minimum((probabilities * bins).astype(np.int64), bins - 1)
    table = []
    for k in range(bins):
        inside = index == k
        count = int(inside.sum())
        table.append((count, int((labels[inside] == 1).sum()), float(probabilities[inside].mean()) if count else 0.0))
    return table


def expected_calibration_error(table: list[tuple[int, int, float]]) -> float | None:
    """Sum over bins of (bin share) x |observed positive rate - mean predicted probability|; None when empty."""
    total = sum(count for count, _, _ in table)
    if total == 0:
        return None
    return sum(count / total * abs(positives / count - predicted) for count, positives, predicted in table if count)


def calibration_metrics(table: list[tuple[int, int, float]], with_table: bool) -> dict[str, float]:
    """`ece` and `ece.n`, and with `with_table` each non-empty bin as `calibration.k.{n,positives,predicted}`."""
    ece = expected_calibration_error(table)
    if ece is None:
        return {}
    metrics = {"ece": ece, "ece" + N: float(sum(count for count, _, _ in table))}
    if with_table:
        for k, (count, positives, predicted) in enumerate(table):
            if count:
                prefix = f"{CALIBRATION}.{k}."
                metrics |= {
                    prefix + "n": float(count),
                    prefix + "positives": float(positives),
                    prefix + "predicted": predicted,
                }
    return metrics


def binary_metrics(probabilities: Array, labels: Array, with_table: bool = False) -> dict[str, float]:
    """Accuracy, sensitivity and specificity at THRESHOLD (Wilson intervals), AUC (bootstrap interval) and
    calibration of P(positive) against 0/1 labels, each with its sample count, in the naming scheme above."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(labels) == 1
    predicted = probabilities > THRESHOLD
    tp, tn = int((predicted & truth).sum()), int((~predicted & ~truth).sum())
    metrics = {
        **proportion("accuracy", tp + tn, len(truth)),
        **proportion("sensitivity", tp, int(truth.sum())),
        **proportion("specificity", tn, int((~truth).sum())),
    }
    auc, interval = roc_auc(probabilities, truth), bootstrap_auc_interval(probabilities, truth)
    if auc is not None and interval is not None:
        metrics |= {"auc": auc, "auc" + N: float(len(truth)), "auc" + LO: interval[0], "auc" + HI: interval[1]}
    return metrics | calibration_metrics(reliability_table(probabilities, truth), with_table)
