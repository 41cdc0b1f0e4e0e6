"""Ditto's client half: a personal model v kept in the silo's job state (see fedmeki_core/algorithms/ditto.py)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fedmeki_core.models.build import restore_tensors, store_tensors, task_view
from fedmeki_core.training.base import LocalSettings, RoundContext
from fedmeki_core.training.fedavg import FedAvgClient
from fedmeki_core.training.local_training import run_local_epochs

if TYPE_CHECKING:
    from torch import nn

    from fedmeki_core.tasks.dataset import ArrayDataset

_PERSONAL = "ditto.personal/"


class DittoClient(FedAvgClient):  # the global model trains as FedAvg's does
    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self._lambda = float(options["lambda"])
        self._personal_epochs = int(options["personal_epochs"])
        self._context: RoundContext | None = None
        self._personal: nn.Module | None = None  # v, trained task by task in the round

    def begin(self, model: nn.Module, context: RoundContext) -> None:
        self._context, self._personal = context, None

    def personalised(
        self, model: nn.Module, task: str, data: ArrayDataset, settings: LocalSettings, device: torch.device
    ) -> nn.Module | None:
        context = self._context
        assert context is not None  # begin() comes first
        if self._personal is None:
            self._personal = self._load_personal(model, context)
        anchors = [
            (p, context.global_tensors[name].to(device))
            for name, p in self._personal.named_parameters()
            if p.requires_grad and name in context.global_tensors
        ]

        def proximal(_features: torch.Tensor) -> torch.Tensor:
            return 0.5 * self._lambda * torch.stack([((p - g) ** 2).sum() for p, g in anchors]).sum()

        personal_settings = LocalSettings(
            local_epochs=self._personal_epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            seed=settings.seed + 1,
            micro_batch_size=settings.micro_batch_size,
            autocast=settings.autocast,
        )
        view = task_view(self._personal, task)
        run_local_epochs(view, data, personal_settings, device, None, self._optimizer, proximal)
        return view

    def finish(self, model: nn.Module, context: RoundContext) -> None:
        if self._personal is not None:
            store_tensors(self._personal, context.state, _PERSONAL)

    @staticmethod
    def _load_personal(model: nn.Module, context: RoundContext) -> nn.Module:
        """A copy of the model (the global weights) with the silo's personal weights where it has them."""
        personal = copy.deepcopy(model)
        restore_tensors(personal, context.state, _PERSONAL)
        return personal
