"""Segmentation metrics from per-pixel logits and 0/1 masks (numpy), the ones silos report each round."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.confidence import bootstrap_mean

SMOOTH = 1.0  # the soft Dice loss's smoothing, the same as `fedmeki_core.models.ct.segmentation_loss`


def dice_scores(pred_masks: np.ndarray[Any, Any], true_masks: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Each sample's Dice 2|P∩T| / (|P| + |T|) over [N, ...] masks; a sample empty in both scores 1.0."""
    if pred_masks.shape != true_masks.shape:
        raise InvalidInputError(f"predicted masks {pred_masks.shape} and true masks {true_masks.shape} differ in shape")
    if not len(true_masks):
        return np.zeros(0)
    pred = pred_masks.reshape(len(pred_masks), -1) > 0
    true = true_masks.reshape(len(true_masks), -1) > 0
    overlap = (pred & true).sum(axis=1)
    total = pred.sum(axis=1) + true.sum(axis=1)
    return np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)


def dice_score(pred_masks: np.ndarray[Any, Any], true_masks: np.ndarray[Any, Any]) -> float:
    """Mean per-sample Dice; no samples score 0.0.

    Per sample, not pooled over pixels: a slice with a tiny lesion weighs as much as one with a large lesion.
    """
    per_sample = dice_scores(pred_masks, true_masks)
    return float(per_sample.mean()) if len(per_sample) else 0.0


def _segmentation_loss(logits: np.ndarray[Any, Any], target: np.ndarray[Any, Any]) -> float:
    """The training loss: mean BCE-with-logits plus 1 - soft Dice pooled over all samples; stable for any logits."""
    bce = np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits)))
    probs = np.exp(-np.logaddexp(0.0, -logits))  # the sigmoid, without overflow
    dice = (2 * (probs * target).sum() + SMOOTH) / (probs.sum() + target.sum() + SMOOTH)
    return float(bce.mean() + 1.0 - dice)


def segmentation_metrics(logits: np.ndarray[Any, Any], masks: np.ndarray[Any, Any]) -> dict[str, float]:
    """Dice of the masks predicted at logit 0 (probability 0.5), with its count and a bootstrap interval over the
    images, and the training loss over the whole set as one batch; logits [N, 1, S, S], masks [N, S, S]."""
    if not len(masks):
        return {"dice": 0.0, "loss": 0.0}
    flat_logits = logits.reshape(len(logits), -1).astype(np.float64)
    target = masks.reshape(len(masks), -1).astype(np.float64)
    if flat_logits.shape != target.shape:
        raise InvalidInputError(f"logits {logits.shape} do not fit masks {masks.shape}")
    dice = bootstrap_mean("dice", dice_scores(flat_logits > 0, target))
    return {**dice, "loss": _segmentation_loss(flat_logits, target)}
