"""The shared local loop: gradient accumulation over micro-batches gives the update of the whole batch."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fedmeki_core.tasks.dataset import ArrayDataset
from fedmeki_core.training import LocalSettings
from fedmeki_core.training.local_training import run_local_epochs


def test_micro_batches_accumulate_to_the_same_update() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(70, 4, 6)).astype(np.float32), rng.integers(0, 2, size=70))
    data = ArrayDataset(data.features.astype(np.float64), data.labels)  # type: ignore[arg-type]
    whole, split = copy.deepcopy(model), copy.deepcopy(model)
    settings = LocalSettings(local_epochs=2, batch_size=32, learning_rate=0.05, seed=3)
    run_local_epochs(whole, data, settings, torch.device("cpu"), None, "sgd")
    micro = LocalSettings(local_epochs=2, batch_size=32, learning_rate=0.05, seed=3, micro_batch_size=5)
    run_local_epochs(split, data, micro, torch.device("cpu"), None, "sgd")
    for (name, a), (_, b) in zip(whole.named_parameters(), split.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-12), name
    assert not torch.allclose(next(whole.parameters()), next(model.parameters()))  # it did train
