"""Classification metrics from logits and labels (numpy), the ones silos report each round."""

from __future__ import annotations

from typing import Any

import numpy as np


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
