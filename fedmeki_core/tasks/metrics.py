"""Classification metrics from logits and labels (numpy), the ones silos report each round."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmeki_core.tasks.confidence import THRESHOLD, binary_metrics, proportion


def classification_metrics(
    logits: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], binary: bool = False, with_table: bool = False
) -> dict[str, float]:
    """Cross-entropy loss, accuracy (with its count and Wilson interval) and macro F1; of a binary task (two
    logits, label 1 the positive class) also sensitivity, specificity, AUC and calibration of P(positive), the
    reliability table with `with_table` (see fedmeki_core.tasks.confidence for the names)."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean()) if len(labels) else 0.0
    positive = np.exp(log_probs[:, 1]) if binary and logits.shape[1] == 2 else None
    predictions = (positive > THRESHOLD).astype(np.int64) if positive is not None else logits.argmax(axis=1)
    f1_scores = []
    for cls in range(logits.shape[1]):
        tp = float(((predictions == cls) & (labels == cls)).sum())
        fp = float(((predictions == cls) & (labels != cls)).sum())
        fn = float(((predictions != cls) & (labels == cls)).sum())
        f1_scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    metrics = {"loss": loss, "accuracy": 0.0, "f1": float(np.mean(f1_scores))}
    metrics |= proportion("accuracy", int((predictions == labels).sum()), len(labels))
    if positive is not None:
        metrics |= binary_metrics(positive, labels, with_table)
    return metrics
