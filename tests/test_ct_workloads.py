"""The PPPML-HMI workloads on the CPU: synthetic CT generators, the 3D classifier and 2D U-Net, Dice metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedmeki_core.models.ct import CtVolumeClassifier, UNet2d, segmentation_loss
from fedmeki_core.tasks.catalog import TASKS
from fedmeki_core.tasks.dataset import load_dataset, save_dataset
from fedmeki_core.tasks.segmentation import dice_score, segmentation_metrics
from fedmeki_core.tasks.synthetic_ct import generate_slices, generate_volumes, volume_bayes_accuracy

DEPTH, SIZE = 16, 32  # volumes for training tests
SLICE_SIZE = 64

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train on one thread: on a busy shared machine, intra-op threads wait on each other for a free core, and
    two threads ran these tests 25 times slower than one (measured: 200 s against 8 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _train(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Loss, epochs: int) -> None:
    """Adam with a one-cycle schedule, so the last epochs settle instead of bouncing at a high learning rate."""
    batch_size, learning_rate = 8, 3e-3 if isinstance(model, CtVolumeClassifier) else 1e-2
    steps = epochs * -(-len(inputs) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(inputs[index]), targets[index]).backward()
            optimizer.step()
            schedule.step()


def _predict(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(inputs)).numpy()


# --- generators ---------------------------------------------------------------------------------------------


def test_volumes_have_the_shape_dtype_and_range_and_repeat_for_the_same_arguments() -> None:
    data = generate_volumes(64, silo_index=1, num_silos=3, seed=4, depth=DEPTH, image_size=SIZE)
    assert data.features.shape == (64, 1, DEPTH, SIZE, SIZE) and data.features.dtype == np.float32
    assert data.labels.shape == (64,) and data.labels.dtype == np.int64
    assert data.features.min() >= 0.0 and data.features.max() <= 1.0
    assert set(data.labels.tolist()) == {0, 1}
    again = generate_volumes(64, silo_index=1, num_silos=3, seed=4, depth=DEPTH, image_size=SIZE)
    np.testing.assert_array_equal(again.features, data.features)
    np.testing.assert_array_equal(again.labels, data.labels)
    other = generate_volumes(64, silo_index=1, num_silos=3, seed=5, depth=DEPTH, image_size=SIZE)
    assert not np.array_equal(other.features, data.features)


def test_silos_differ_in_label_balance_and_scanner_intensity() -> None:
    first = generate_volumes(200, silo_index=0, num_silos=3, depth=4, image_size=16, label_noise=0.0)
    last = generate_volumes(200, silo_index=2, num_silos=3, depth=4, image_size=16, label_noise=0.0)
    assert first.labels.mean() < 0.4 < 0.6 < last.labels.mean()
    healthy_brightness = [d.features[d.labels == 0].mean() for d in (first, last)]
    assert healthy_brightness[1] > healthy_brightness[0] + 0.02


def test_label_noise_flips_only_labels_so_the_bayes_accuracy_is_below_one() -> None:
    assert 0.6 < volume_bayes_accuracy() < 1.0
    assert volume_bayes_accuracy(0.1) == pytest.approx(0.9)
    clean = generate_volumes(400, silo_index=1, num_silos=3, depth=4, image_size=16, label_noise=0.0)
    noisy = generate_volumes(400, silo_index=1, num_silos=3, depth=4, image_size=16, label_noise=0.1)
    np.testing.assert_array_equal(clean.features, noisy.features)
    assert 0.05 < (clean.labels != noisy.labels).mean() < 0.15


def test_patients_show_opacities_in_the_lungs() -> None:
    data = generate_volumes(100, silo_index=1, num_silos=3, depth=DEPTH, image_size=SIZE, label_noise=0.0)
    # Ground glass: voxels between aerated lung (~0.12) and soft tissue (~0.45).
    hazy = ((data.features > 0.22) & (data.features < 0.4)).reshape(len(data), -1).mean(axis=1)
    assert hazy[data.labels == 1].mean() > 1.5 * hazy[data.labels == 0].mean()


def test_slices_have_masks_on_brighter_pixels_and_some_slices_none() -> None:
    data = generate_slices(48, silo_index=1, num_silos=3, seed=2, image_size=SLICE_SIZE)
    assert data.features.shape == (48, 1, SLICE_SIZE, SLICE_SIZE) and data.features.dtype == np.float32
    assert data.masks is not None and data.masks.shape == (48, SLICE_SIZE, SLICE_SIZE)
    assert data.masks.dtype == np.uint8 and set(np.unique(data.masks).tolist()) == {0, 1}
    assert (data.labels == -1).all()
    assert data.features.min() >= 0.0 and data.features.max() <= 1.0
    infected = data.masks.reshape(48, -1).any(axis=1)
    assert 0 < infected.sum() < 48
    lesion = data.features[:, 0][data.masks == 1]
    assert 0.2 < np.median(lesion) < 0.45  # denser than aerated lung, below soft tissue: overlapping vessels
    again = generate_slices(48, silo_index=1, num_silos=3, seed=2, image_size=SLICE_SIZE)
    np.testing.assert_array_equal(again.features, data.features)
    np.testing.assert_array_equal(again.masks, data.masks)


def test_generated_data_pass_the_dataset_checks_of_their_tasks(tmp_path: Path) -> None:
    volumes = generate_volumes(3, silo_index=0, num_silos=2, depth=32, image_size=16)
    save_dataset(volumes, tmp_path / "volumes.safetensors")
    loaded = load_dataset(tmp_path / "volumes.safetensors", TASKS["ct-covid"], image_size=16)
    np.testing.assert_array_equal(loaded.features, volumes.features)
    slices = generate_slices(3, silo_index=0, num_silos=2, image_size=16)
    save_dataset(slices, tmp_path / "slices.safetensors")
    loaded = load_dataset(tmp_path / "slices.safetensors", TASKS["ct-infection-segmentation"], image_size=16)
    assert loaded.masks is not None and slices.masks is not None
    np.testing.assert_array_equal(loaded.masks, slices.masks)


# --- metrics ------------------------------------------------------------------------------------------------


def test_dice_score_matches_hand_computed_values() -> None:
    true = np.zeros((4, 2, 3), dtype=np.uint8)
    pred = np.zeros((4, 2, 3), dtype=np.uint8)
    true[0, 0, :2] = 1  # |T| = 2
    pred[0, 0, 1:] = 1  # |P| = 2, overlap 1: Dice 2 * 1 / 4 = 0.5
    true[1, :, 0] = 1  # |T| = 2, nothing predicted: Dice 0
    pred[2, 1, 2] = 1  # nothing true, one false positive: Dice 0
    # sample 3: empty in both: Dice 1
    assert dice_score(pred, true) == (0.5 + 0.0 + 0.0 + 1.0) / 4
    assert dice_score(true, true) == 1.0
    assert dice_score(pred[:1], true[:1]) == 0.5
    assert dice_score(pred[3:], true[3:]) == 1.0


def test_segmentation_metrics_threshold_at_logit_zero_and_report_the_training_loss() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(5, 1, 8, 8)).astype(np.float32)
    masks = (rng.random((5, 8, 8)) < 0.3).astype(np.uint8)
    metrics = segmentation_metrics(logits, masks)
    assert metrics["dice"] == dice_score((logits[:, 0] > 0).astype(np.uint8), masks)
    torch_loss = segmentation_loss(torch.from_numpy(logits), torch.from_numpy(masks))
    assert metrics["loss"] == pytest.approx(float(torch_loss), rel=1e-5)
    assert segmentation_metrics(np.where(masks[:, None] == 1, 50.0, -50.0), masks)["dice"] == 1.0


# --- models -------------------------------------------------------------------------------------------------


def test_models_map_their_inputs_to_logits_and_initialise_deterministically() -> None:
    torch.manual_seed(7)
    classifier = CtVolumeClassifier({"channels": 4, "depth": 2})
    assert classifier(torch.zeros(2, 1, 5, 9, 9)).shape == (2, 2)
    torch.manual_seed(7)
    twin = CtVolumeClassifier({"channels": 4, "depth": 2})
    for a, b in zip(classifier.state_dict().values(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    unet = UNet2d({"channels": 4, "levels": 3})
    assert unet(torch.zeros(2, 1, 33, 33)).shape == (2, 1, 33, 33)  # odd sizes line up with their skips
    for model in (classifier, unet):
        # Nothing a federated average would have to reconcile besides parameters.
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert dict(model.named_buffers()) == {}


@pytest.mark.usefixtures("one_thread")
def test_the_volume_classifier_learns_to_tell_patients_from_healthy() -> None:
    train = generate_volumes(128, silo_index=1, num_silos=3, seed=0, depth=DEPTH, image_size=SIZE)
    held_out = generate_volumes(128, silo_index=1, num_silos=3, seed=1, depth=DEPTH, image_size=SIZE)
    torch.manual_seed(0)
    model = CtVolumeClassifier({})
    untrained = (_predict(model, held_out.features).argmax(axis=1) == held_out.labels).mean()
    _train(model, torch.from_numpy(train.features), torch.from_numpy(train.labels), nn.functional.cross_entropy, 12)
    accuracy = (_predict(model, held_out.features).argmax(axis=1) == held_out.labels).mean()
    assert accuracy >= 0.75
    assert accuracy >= untrained + 0.2
    assert accuracy <= volume_bayes_accuracy() + 0.05  # flipped labels cap what any model scores


@pytest.mark.usefixtures("one_thread")
def test_the_unet_learns_to_segment_infection() -> None:
    train = generate_slices(128, silo_index=1, num_silos=3, seed=0, image_size=SLICE_SIZE)
    held_out = generate_slices(64, silo_index=1, num_silos=3, seed=1, image_size=SLICE_SIZE)
    assert train.masks is not None and held_out.masks is not None
    torch.manual_seed(0)
    model = UNet2d({})
    untrained = segmentation_metrics(_predict(model, held_out.features), held_out.masks)
    _train(model, torch.from_numpy(train.features), torch.from_numpy(train.masks), segmentation_loss, 10)
    trained = segmentation_metrics(_predict(model, held_out.features), held_out.masks)
    assert trained["dice"] >= 0.6
    assert trained["dice"] >= untrained["dice"] + 0.3
    assert trained["loss"] < untrained["loss"]
    infected = held_out.masks.reshape(len(held_out), -1).any(axis=1)
    predicted = (_predict(model, held_out.features[infected])[:, 0] > 0).astype(np.uint8)
    assert dice_score(predicted, held_out.masks[infected]) >= 0.5  # lesions found, not just empty slices left empty
