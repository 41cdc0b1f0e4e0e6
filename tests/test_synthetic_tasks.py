"""Synthetic FedMEKI data: shapes, determinism, silo skew, Bayes accuracies, learnability and answers the data backs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedmeki_core.errors import InvalidInputError, NotFoundError
from fedmeki_core.tasks.catalog import SUITES, TASKS, LabelType, Modality
from fedmeki_core.tasks.dataset import ArrayDataset, load_dataset, save_dataset
from fedmeki_core.tasks.synthetic import GENERATORS, bayes_accuracy, generate
from fedmeki_core.tasks.synthetic_ecg import LEADS, NOISE_KINDS
from fedmeki_core.tasks.synthetic_ehr import FEATURE_NAMES, mortality_risk, sepsis_risk

IMAGE_SIZE = 32
TASK_NAMES = SUITES["fedmeki"].tasks
BINARY = tuple(name for name in TASK_NAMES if TASKS[name].label_type == LabelType.BINARY)
TEXT = tuple(name for name in TASK_NAMES if TASKS[name].label_type == LabelType.TEXT)
Array = np.ndarray[Any, Any]


def _make(name: str, n: int, silo: int = 0, silos: int = 1, seed: int = 0, size: int = IMAGE_SIZE) -> ArrayDataset:
    return generate(name, n, silo, silos, seed=seed, image_size=size)


def _label_shares(dataset: ArrayDataset) -> Counter[str]:
    """Class shares of a binary task's labels, or answer shares of a text task."""
    values = [str(label) for label in dataset.labels] if not dataset.answers else list(dataset.answers)
    return Counter({value: count / len(values) for value, count in Counter(values).items()})


# --- the registry -------------------------------------------------------------------------------------------------


def test_every_task_has_a_generator() -> None:
    assert set(GENERATORS) == set(TASKS)  # the 8 FedMEKI tasks, the 2 CT tasks, the demo's vitals, tables


def test_unknown_tasks_and_tasks_without_a_bayes_accuracy_are_refused() -> None:
    with pytest.raises(NotFoundError):
        generate("no-such-task", 4, 0, 1)
    with pytest.raises(InvalidInputError):
        bayes_accuracy("medvqa")
    with pytest.raises(InvalidInputError):
        bayes_accuracy("synthetic-vitals")


def test_image_size_reaches_only_image_tasks() -> None:
    assert _make("ecg-abnormal", 2, size=48).features.shape == (2, 12, 1000)
    assert _make("lung-opacity", 2, size=48).features.shape == (2, 1, 48, 48)
    assert generate("covid-19", 1, 0, 1).features.shape == (1, *TASKS["covid-19"].input_shape)


# --- every task ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_shapes_dtypes_and_values(name: str) -> None:
    task, dataset = TASKS[name], _make(name, 24)
    assert dataset.features.shape == (24, *task.sample_shape(IMAGE_SIZE))
    assert dataset.features.dtype == np.float32 and dataset.labels.dtype == np.int64
    assert np.isfinite(dataset.features).all()
    if task.label_type == LabelType.TEXT:
        assert len(dataset.questions) == len(dataset.answers) == 24 and (dataset.labels == -1).all()
        assert all(question.endswith("?") and answer for question, answer in zip(*_texts(dataset), strict=True))
    else:
        assert set(dataset.labels.tolist()) <= set(range(task.num_classes)) and not dataset.questions
    if task.modality == Modality.XRAY:
        assert dataset.features.min() >= 0.0 and dataset.features.max() <= 1.0


def _texts(dataset: ArrayDataset) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return dataset.questions, dataset.answers


@pytest.mark.parametrize("name", TASK_NAMES)
def test_the_same_arguments_give_the_same_data(name: str) -> None:
    first, again, other_seed = _make(name, 16, 1, 3), _make(name, 16, 1, 3), _make(name, 16, 1, 3, seed=1)
    assert np.array_equal(first.features, again.features) and np.array_equal(first.labels, again.labels)
    assert first.questions == again.questions and first.answers == again.answers
    assert not np.array_equal(first.features, other_seed.features)
    assert not np.array_equal(first.features, _make(name, 16, 2, 3).features)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_silos_see_different_label_balance(name: str) -> None:
    low, high = _label_shares(_make(name, 400, 0, 3)), _label_shares(_make(name, 400, 2, 3))
    total_variation = sum(abs(low[key] - high[key]) for key in set(low) | set(high)) / 2
    assert total_variation > 0.15, (low, high)


@pytest.mark.parametrize("name", BINARY)
def test_bayes_accuracy_is_high_but_below_one(name: str) -> None:
    for silo in range(3):
        assert 0.6 < bayes_accuracy(name, 2000, silo, 3) < 1.0


@pytest.mark.parametrize(("name", "risk"), [("mortality", mortality_risk), ("sepsis", sepsis_risk)])
def test_ehr_risks_are_the_ones_the_labels_were_drawn_from(name: str, risk: Callable[..., Array]) -> None:
    """The oracle that predicts risk > 0.5 scores the Bayes accuracy on the generated labels."""
    labels, p = _make(name, 3000, 1, 3, seed=4).labels, risk(3000, 1, 3, seed=4)
    assert abs(((p > 0.5) == labels).mean() - bayes_accuracy(name, 3000, 1, 3, seed=4)) < 0.03


# --- learnability: a tiny model beats chance on held-out data -----------------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small models train fastest on one thread, and seeded runs then give the same result."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


class _PooledConv1d(nn.Module):
    """Two temporal convolutions, then mean and max over time: findings may appear at any time."""

    def __init__(self, channels: int, pool: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(channels, 16, 7, padding=3), nn.ReLU(), nn.MaxPool1d(pool), nn.Conv1d(16, 16, 7, padding=3)
        )
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.body(x))
        return self.head(torch.cat([hidden.mean(-1), hidden.amax(-1)], dim=1)).squeeze(1)


def _image_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, 1),
        nn.Flatten(0),
    )


def _model_and_inputs(name: str) -> tuple[nn.Module, Callable[[Array], torch.Tensor]]:
    modality = TASKS[name].modality
    if modality == Modality.XRAY:
        return _image_model(), torch.from_numpy
    if modality == Modality.ECG:
        return _PooledConv1d(12, 4), torch.from_numpy
    return _PooledConv1d(48, 2), lambda features: torch.from_numpy(features.transpose(0, 2, 1).copy())


def _train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int = 20) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", BINARY)
def test_a_tiny_model_learns_the_task(name: str) -> None:
    train, held_out = _make(name, 600, seed=1), _make(name, 400, seed=2)
    model, to_tensor = _model_and_inputs(name)
    _train(model, to_tensor(train.features), torch.from_numpy(train.labels).float())
    with torch.no_grad():
        accuracy = float(((model(to_tensor(held_out.features)) > 0).numpy() == held_out.labels).mean())
    chance = max(held_out.labels.mean(), 1.0 - held_out.labels.mean())
    assert chance + 0.1 < accuracy < bayes_accuracy(name, 400, 0, 1, seed=2) + 0.05, (accuracy, chance)


# --- text tasks: a hand-written detector reads the answers off the features ---------------------------------------


def _region(image: Array, u: tuple[float, float], v: tuple[float, float]) -> Array:
    """Pixels in image coordinates u (left to right) and v (top to bottom), both in [-1, 1]."""
    rows, cols = (np.round((np.array(span) + 1.0) / 2.0 * image.shape[0]).astype(int) for span in (v, u))
    return image[rows[0] : rows[1], cols[0] : cols[1]]


def _blur(image: Array) -> Array:
    padded = np.pad(image, 1, mode="edge")
    rows, cols = image.shape
    return np.mean([padded[i : i + rows, j : j + cols] for i in range(3) for j in range(3)], axis=0)


def _opacity_scores(image: Array) -> tuple[float, float]:
    """(patient's right, patient's left) lung: mean brightness over the darkest, inside each lung's middle.

    The patient's right lung lies on the image's left; the left lung's box stops above the heart.
    """
    image = _blur(image)
    right = _region(image, (-0.56, -0.24), (-0.42, 0.3))
    left = _region(image, (0.24, 0.56), (-0.42, 0.0))
    return float(right.mean() - np.percentile(right, 5)), float(left.mean() - np.percentile(left, 5))


def _heart_width(image: Array) -> float:
    """Width (in image units) of the bright run through the centre at the heart's level."""
    size = image.shape[0]
    profile = image[round(0.64 * size) : round(0.68 * size)].mean(axis=0)
    centre = size // 2
    threshold = (profile[centre - 2 : centre + 2].mean() + np.percentile(profile[size // 8 : -size // 8], 5)) / 2
    left, right = centre, centre
    while left > 0 and profile[left] > threshold:
        left -= 1
    while right < size - 1 and profile[right] > threshold:
        right += 1
    return (right - left) / size * 2.0


def _read_chest(image: Array, question: str) -> str:
    right, left = (score > 0.065 for score in _opacity_scores(image))
    if "heart" in question or "cardi" in question:
        return "yes, the heart is enlarged" if _heart_width(image) > 0.7 else "no, the heart size is normal"
    if question.startswith(("Which", "Where")):
        return {(True, False): "right lung", (False, True): "left lung", (True, True): "both lungs"}.get(
            (right, left), ""
        )
    return "yes" if right or left else "no"


def test_medvqa_answers_follow_the_image() -> None:
    dataset = _make("medvqa", 600, 1, 3, size=64)
    read = [_read_chest(image[0], q) for image, q in zip(dataset.features, dataset.questions, strict=True)]
    for kind in ("yes", "lung", "heart"):
        pairs = [
            (r, a) for r, a in zip(read, dataset.answers, strict=True) if kind in a or (kind == "yes" and a == "no")
        ]
        agreement = np.mean([r == a for r, a in pairs])
        assert len(pairs) > 60 and agreement > 0.85, (kind, agreement)


def _read_noise(signal: Array) -> str:
    """Burst: one second far louder than the lead's typical second; static: loud everywhere; drift: 0.1-0.5 Hz."""
    high = signal[:, 1:-1] - (signal[:, :-2] + signal[:, 2:]) / 2.0  # a second difference: the QRS barely shows
    per_second = (high[:, :990] ** 2).reshape(len(LEADS), 10, 99).mean(axis=2)
    typical = np.median(per_second, axis=1)
    spectrum = np.abs(np.fft.rfft(signal - signal.mean(axis=1, keepdims=True), axis=1)) ** 2 / signal.shape[1]
    if (per_second.max(axis=1) / typical).max() > 20.0:
        return "burst noise"
    if typical.max() > 0.015:
        return "static noise"
    return "baseline drift" if spectrum[:, 1:6].sum(axis=1).max() > 10.0 else "none"


def test_ecg_noise_answers_follow_the_signal() -> None:
    dataset = _make("ecg-noise", 400, 1, 3)
    agree = []
    for signal, question, answer in zip(dataset.features, dataset.questions, dataset.answers, strict=True):
        kind = _read_noise(signal.astype(np.float64))
        if answer in NOISE_KINDS:
            agree.append(kind == answer)
        elif "any noise" in question:
            agree.append((kind != "none") == (answer == "yes"))
        else:
            agree.append((kind in question) == (answer == "yes"))
    assert np.mean(agree) > 0.95


def test_text_round_trips_through_the_dataset_file(tmp_path: Path) -> None:
    dataset = _make("ecg-noise", 12)
    save_dataset(dataset, tmp_path / "ecg-noise.safetensors")
    loaded = load_dataset(tmp_path / "ecg-noise.safetensors", TASKS["ecg-noise"])
    assert np.array_equal(loaded.features, dataset.features) and np.array_equal(loaded.labels, dataset.labels)
    assert loaded.questions == dataset.questions and loaded.answers == dataset.answers


# --- physiology ---------------------------------------------------------------------------------------------------


def test_ecg_leads_follow_einthoven_and_goldberger() -> None:
    signal = _make("ecg-abnormal", 20).features.astype(np.float64)
    lead = {name: signal[:, i] for i, name in enumerate(LEADS)}
    residuals = [
        lead["III"] - (lead["II"] - lead["I"]),
        lead["aVR"] + (lead["I"] + lead["II"]) / 2.0,
        lead["aVL"] - (lead["I"] - lead["II"] / 2.0),
        lead["aVF"] - (lead["II"] - lead["I"] / 2.0),
    ]
    for residual in residuals:
        assert np.sqrt(np.mean(residual**2)) < 0.03  # electrode noise is 0.01 mV per lead
    assert np.abs(np.median(signal, axis=2)).max() < 0.15  # the baseline sits at 0 mV


def test_ehr_features_move_the_way_physiology_says() -> None:
    assert len(FEATURE_NAMES) == 48 == len(set(FEATURE_NAMES))
    column = {name: i for i, name in enumerate(FEATURE_NAMES)}
    dying = _make("mortality", 1000, seed=3)
    last_hours = dying.features[:, -6:].mean(axis=1)
    for name, sign in (("mean_arterial_pressure", -1), ("lactate", 1), ("gcs_total", -1), ("creatinine", 1)):
        correlation = np.corrcoef(last_hours[:, column[name]], dying.labels)[0, 1]
        assert sign * correlation > 0.2, (name, correlation)
    septic = _make("sepsis", 600, seed=3)
    rise = septic.features[:, -24:].mean(axis=1) - septic.features[:, :12].mean(axis=1)
    for name in ("temperature", "wbc", "lactate", "respiratory_rate"):
        by_label = [rise[septic.labels == label, column[name]].mean() for label in (0, 1)]
        assert by_label[1] - by_label[0] > 0.5, (name, by_label)
