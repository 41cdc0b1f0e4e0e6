"""A task's local data as arrays, and the one file format silos keep it in (safetensors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedmeki_core.errors import InvalidInputError


@dataclass(frozen=True)
class ArrayDataset:
    features: np.ndarray[Any, np.dtype[np.float32]]
    labels: np.ndarray[Any, np.dtype[np.int64]]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def split(self, holdout_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
        """A (train, evaluation) split, the same for the same seed."""
        order = np.random.default_rng(seed).permutation(len(self))
        cut = len(self) - max(1, round(len(self) * holdout_fraction))
        train, held = order[:cut], order[cut:]
        return (
            ArrayDataset(self.features[train], self.labels[train]),
            ArrayDataset(self.features[held], self.labels[held]),
        )


def save_dataset(dataset: ArrayDataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": dataset.features, "labels": dataset.labels}, str(path))


def load_dataset(path: Path, input_shape: tuple[int, ...], num_classes: int) -> ArrayDataset:
    """Load and check a dataset file: features [N, *input_shape] float32, labels [N] in [0, num_classes)."""
    if not path.is_file():
        raise InvalidInputError(f"data file {path} does not exist")
    try:
        arrays = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise InvalidInputError(f"{path}: not a readable safetensors dataset ({exc})") from None
    if {"features", "labels"} - arrays.keys():
        raise InvalidInputError(f"{path}: needs tensors 'features' and 'labels', has {sorted(arrays)}")
    features, labels = arrays["features"].astype(np.float32), arrays["labels"].astype(np.int64)
    if tuple(features.shape[1:]) != input_shape or features.shape[0] != labels.shape[0]:
        raise InvalidInputError(
            f"{path}: features {list(features.shape)} and labels {list(labels.shape)} do not fit "
            f"[N, {', '.join(map(str, input_shape))}] and [N]"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InvalidInputError(f"{path}: labels must lie in [0, {num_classes})")
    return ArrayDataset(features, labels)
