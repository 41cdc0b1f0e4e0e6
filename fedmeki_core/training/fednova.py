"""FedNova's client half: counts its local steps, uploads its delta per step (algorithms/fednova.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedmeki_core.training.base import ClientHalf, LocalSettings, ProgressCallback, RoundContext, local_steps
from fedmeki_core.training.local_training import run_local_epochs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedmeki_core.tasks.dataset import ArrayDataset


class FedNovaClient(ClientHalf):
    def __init__(self, options: Mapping[str, Any]) -> None:
        self._optimizer = str(options["optimizer"])
        self._steps = 0

    def begin(self, model: nn.Module, context: RoundContext) -> None:
        self._steps = 0

    def train(
        self,
        model: nn.Module,
        data: ArrayDataset,
        settings: LocalSettings,
        device: torch.device,
        progress: ProgressCallback | None = None,
    ) -> dict[str, float]:
        self._steps += local_steps(settings, len(data))
        return run_local_epochs(model, data, settings, device, progress, self._optimizer)

    def finish(self, model: nn.Module, context: RoundContext) -> None:
        steps = max(self._steps, 1)
        context.delta_scale, context.local_steps = 1.0 / steps, steps
