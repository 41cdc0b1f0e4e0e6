"""Classification metrics from logits and labels (numpy), the ones silos report each round, and their intervals."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EVAL_SAMPLES = "eval_samples"  # the held-out samples a silo's eval_* metrics score (a count, not a mean)
Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile


def classification_metrics(logits: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> dict[str, float]:
    """Cross-entropy loss, accuracy and macro F1."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean()) if len(labels) else 0.0
    predictions = logits.argmax(axis=1)
    accuracy = float((predictions == labels).mean()) if len(labels) else 0.0
    f1_scores = []
    for cls in range(logits.shape[1]):
        tp = float(((predictions == cls) & (labels == cls)).sum())
        fp = float(((predictions == cls) & (labels != cls)).sum())
        fn = float(((predictions != cls) & (labels == cls)).sum())
        f1_scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"loss": loss, "accuracy": accuracy, "f1": float(np.mean(f1_scores))}


def wilson_interval(proportion: float, samples: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion observed on `samples` trials; (0, 1) for none.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or 1: 24 of 24 correct gives
    0.862 to 1, not 1 to 1."""
    if samples <= 0:
        return 0.0, 1.0
    p = min(max(proportion, 0.0), 1.0)
    denominator = 1 + z * z / samples
    centre = (p + z * z / (2 * samples)) / denominator
    half = z * math.sqrt(p * (1 - p) / samples + z * z / (4 * samples * samples)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
