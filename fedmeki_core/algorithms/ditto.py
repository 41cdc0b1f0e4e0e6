"""Ditto (Li et al. 2021): FedAvg for the global model, plus a personal model each silo keeps to itself.

Each round the silo first trains its personal model v (kept in its job state; the global model at first) on its
own data with the proximal term (lambda / 2) ||v - w_global||^2, evaluates it on its held-out split (reported as
`personal_eval_*`), then trains the global model as FedAvg does. Only the global model's delta leaves the silo.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedmeki_core.algorithms.base import LocalSettings, RoundContext
from fedmeki_core.algorithms.fedavg import FedAvgClient, FedAvgFamilyEntry, FedAvgServer
from fedmeki_core.errors import InvalidInputError

if TYPE_CHECKING:
    import torch
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
        import torch

        from fedmeki_core.algorithms.local_training import run_local_epochs
        from fedmeki_core.models.build import task_view

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
        from fedmeki_core.models.build import store_tensors

        if self._personal is not None:
            store_tensors(self._personal, context.state, _PERSONAL)

    @staticmethod
    def _load_personal(model: nn.Module, context: RoundContext) -> nn.Module:
        """A copy of the model (the global weights) with the silo's personal weights where it has them."""
        from fedmeki_core.models.build import restore_tensors

        personal = copy.deepcopy(model)
        restore_tensors(personal, context.state, _PERSONAL)
        return personal


class _DittoEntry(FedAvgFamilyEntry):
    def validate_options(self, options: Mapping[str, Any]) -> None:
        super().validate_options(options)
        if float(options.get("lambda", 0.1)) < 0:
            raise InvalidInputError("ditto option 'lambda' must be non-negative")
        if int(options.get("personal_epochs", 1)) < 1:
            raise InvalidInputError("ditto option 'personal_epochs' must be at least 1")


DITTO = _DittoEntry(
    name="ditto",
    description="FedAvg plus a personal model per silo, kept near the global one by (lambda / 2) ||v - w||^2",
    defaults={
        "lambda": 0.1,
        "personal_epochs": 1,
        "weighted": True,
        "server_learning_rate": 1.0,
        "optimizer": "adam",
    },
    client=DittoClient,
    server=FedAvgServer,
)
