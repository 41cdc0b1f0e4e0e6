"""A task's local data as arrays, and the one file format silos keep it in (safetensors).

Tensors in a dataset file: `features` float32 [N, *sample], `labels` int64 [N] (-1 where a task has no class
label), and where the task has them `targets` float32 [N] (a regression task's real-valued labels),
`masks` uint8 [N, S, S], and questions/answers as UTF-8 bytes with int64
end offsets (`question_bytes`, `question_ends`, `answer_bytes`, `answer_ends`). Text stays text: no pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.catalog import RESIZABLE, LabelType, TaskInfo

FloatArray = np.ndarray[Any, np.dtype[np.float32]]
IntArray = np.ndarray[Any, np.dtype[np.int64]]


@dataclass(frozen=True)
class ArrayDataset:
    features: FloatArray
    labels: IntArray
    masks: np.ndarray[Any, np.dtype[np.uint8]] | None = None
    questions: tuple[str, ...] = field(default=())
    answers: tuple[str, ...] = field(default=())
    targets: FloatArray | None = None  # a regression task's labels; `labels` are then -1

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray[Any, Any]) -> ArrayDataset:
        return ArrayDataset(
            features=self.features[index],
            labels=self.labels[index],
            masks=None if self.masks is None else self.masks[index],
            questions=tuple(self.questions[i] for i in index) if self.questions else (),
            answers=tuple(self.answers[i] for i in index) if self.answers else (),
            targets=None if self.targets is None else self.targets[index],
        )

    def split(self, holdout_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
        """A (train, evaluation) split, the same for the same seed."""
        order = np.random.default_rng(seed).permutation(len(self))
        cut = len(self) - max(1, round(len(self) * holdout_fraction))
        return self.subset(order[:cut]), self.subset(order[cut:])


def _encode_texts(texts: tuple[str, ...]) -> tuple[np.ndarray[Any, Any], IntArray]:
    encoded = [text.encode() for text in texts]
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return data, np.cumsum([len(e) for e in encoded], dtype=np.int64)


def _decode_texts(data: np.ndarray[Any, Any], ends: np.ndarray[Any, Any], path: Path, name: str) -> tuple[str, ...]:
    raw = data.astype(np.uint8).tobytes()
    if ends.ndim != 1 or (ends.size and (np.any(np.diff(ends) < 0) or ends[0] < 0 or ends[-1] != len(raw))):
        raise InvalidInputError(f"{path}: {name}_ends must be non-decreasing end offsets into {name}_bytes")
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    try:
        return tuple(raw[s:e].decode() for s, e in zip(starts.tolist(), ends.tolist(), strict=True))
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path}: {name}_bytes is not UTF-8") from None


def save_dataset(dataset: ArrayDataset, path: Path) -> None:
    tensors: dict[str, np.ndarray[Any, Any]] = {
        "features": np.ascontiguousarray(dataset.features, dtype=np.float32),
        "labels": np.ascontiguousarray(dataset.labels, dtype=np.int64),
    }
    if dataset.targets is not None:
        tensors["targets"] = np.ascontiguousarray(dataset.targets, dtype=np.float32)
    if dataset.masks is not None:
        tensors["masks"] = np.ascontiguousarray(dataset.masks, dtype=np.uint8)
    for name, texts in (("question", dataset.questions), ("answer", dataset.answers)):
        if texts:
            tensors[f"{name}_bytes"], tensors[f"{name}_ends"] = _encode_texts(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def load_dataset(path: Path, task: TaskInfo, image_size: int | None = None) -> ArrayDataset:
    """Load and check a dataset file against the task: sample shape, label range, masks and texts present.

    Images must be `image_size` pixels square; without one, any square size is accepted.
    """
    if not path.is_file():
        raise InvalidInputError(f"data file {path} does not exist")
    try:
        arrays = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise InvalidInputError(f"{path}: not a readable safetensors dataset ({exc})") from None
    if {"features", "labels"} - arrays.keys():
        raise InvalidInputError(f"{path}: needs tensors 'features' and 'labels', has {sorted(arrays)}")
    features, labels = arrays["features"].astype(np.float32), arrays["labels"].astype(np.int64)
    if image_size is None and task.modality in RESIZABLE and features.ndim == len(task.input_shape) + 1:
        image_size = int(features.shape[1 + RESIZABLE[task.modality][0]])  # any square size the file holds
    shape = task.sample_shape(image_size)
    if tuple(features.shape[1:]) != shape or features.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise InvalidInputError(
            f"{path}: features {list(features.shape)} and labels {list(labels.shape)} do not fit "
            f"[N, {', '.join(map(str, shape))}] and [N] for task {task.name}"
        )
    if not np.isfinite(features).all():
        raise InvalidInputError(f"{path}: features hold NaN or infinite values")
    classified = task.label_type in (LabelType.BINARY, LabelType.SILO_CLASSES, LabelType.MULTICLASS)
    if classified and labels.size and (labels.min() < 0 or labels.max() >= task.num_classes):
        raise InvalidInputError(f"{path}: labels must lie in [0, {task.num_classes}) for task {task.name}")
    targets = arrays.get("targets")
    if task.label_type == LabelType.REGRESSION:
        if targets is None or targets.shape != labels.shape:
            raise InvalidInputError(f"{path}: task {task.name} needs targets [N], one real number per sample")
        if not np.isfinite(targets).all():
            raise InvalidInputError(f"{path}: targets hold NaN or infinite values")
    masks = arrays.get("masks")
    if task.label_type == LabelType.MASK:
        if masks is None or masks.shape != (features.shape[0], *shape[1:]):
            raise InvalidInputError(f"{path}: task {task.name} needs masks [N, {shape[1]}, {shape[2]}]")
        if masks.size and masks.max() > 1:
            raise InvalidInputError(f"{path}: masks must hold 0 or 1")
    texts: dict[str, tuple[str, ...]] = {}
    for name in ("question", "answer"):
        if f"{name}_bytes" in arrays and f"{name}_ends" in arrays:
            texts[name] = _decode_texts(arrays[f"{name}_bytes"], arrays[f"{name}_ends"], path, name)
            if len(texts[name]) != features.shape[0]:
                raise InvalidInputError(f"{path}: {len(texts[name])} {name}s for {features.shape[0]} samples")
    if task.label_type == LabelType.TEXT and len(texts) != 2:
        raise InvalidInputError(f"{path}: task {task.name} needs questions and answers")
    return ArrayDataset(
        features,
        labels,
        masks=None if masks is None else masks.astype(np.uint8),
        questions=texts.get("question", ()),
        answers=texts.get("answer", ()),
        targets=None if targets is None or task.label_type != LabelType.REGRESSION else targets.astype(np.float32),
    )
