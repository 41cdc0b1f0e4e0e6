"""FedAvg's client half: local epochs of the shared loop (also the client half of the server optimisers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedmeki_core.training.base import ClientHalf, LocalSettings, ProgressCallback
from fedmeki_core.training.local_training import run_local_epochs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedmeki_core.tasks.dataset import ArrayDataset


class FedAvgClient(ClientHalf):
    def __init__(self, options: Mapping[str, Any]) -> None:
        self._optimizer = str(options["optimizer"])

    def train(
        self,
        model: nn.Module,
        data: ArrayDataset,
        settings: LocalSettings,
        device: torch.device,
        progress: ProgressCallback | None = None,
    ) -> dict[str, float]:
        return run_local_epochs(model, data, settings, device, progress, self._optimizer)
