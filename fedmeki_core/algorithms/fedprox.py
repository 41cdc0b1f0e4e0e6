"""FedProx (Li et al. 2020): FedAvg whose local objective adds (mu / 2) * ||w - w_global||^2.

The proximal term keeps each silo's model near the round's global model, which bounds client drift on non-IID
data; the server half is FedAvg's. FedMEKI's code uses mu = 1e-6; the usual default elsewhere is 0.01.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedmeki_core.algorithms.base import AlgorithmEntry, ClientHalf, LocalSettings, ProgressCallback
from fedmeki_core.algorithms.fedavg import FedAvgServer, validate_fedavg_options
from fedmeki_core.errors import InvalidInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedmeki_core.tasks.dataset import ArrayDataset


class FedProxClient(ClientHalf):
    def __init__(self, options: Mapping[str, Any]) -> None:
        self._optimizer = str(options["optimizer"])
        self._mu = float(options["mu"])

    def train(
        self,
        model: nn.Module,
        data: ArrayDataset,
        settings: LocalSettings,
        device: torch.device,
        progress: ProgressCallback | None = None,
    ) -> dict[str, float]:
        import torch

        from fedmeki_core.algorithms.local_training import run_local_epochs

        trainable = [p for p in model.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in trainable]  # the round's global model

        def proximal(_features: torch.Tensor) -> torch.Tensor:
            total = sum(((p - g) ** 2).sum() for p, g in zip(trainable, anchor, strict=True))
            return 0.5 * self._mu * torch.as_tensor(total)

        return run_local_epochs(model, data, settings, device, progress, self._optimizer, proximal)


class _FedProxEntry(AlgorithmEntry):
    def validate_options(self, options: Mapping[str, Any]) -> None:
        super().validate_options(options)
        validate_fedavg_options(self.name, options)
        if float(options.get("mu", 0.01)) < 0:
            raise InvalidInputError("fedprox option 'mu' must be non-negative")


FEDPROX = _FedProxEntry(
    name="fedprox",
    description="FedAvg with a proximal term (mu / 2) ||w - w_global||^2 in each silo's local objective",
    defaults={"mu": 0.01, "weighted": True, "server_learning_rate": 1.0, "optimizer": "adam"},
    client=FedProxClient,
    server=FedAvgServer,
)
