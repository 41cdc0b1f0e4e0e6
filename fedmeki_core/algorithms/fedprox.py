"""FedProx (Li et al. 2020): FedAvg whose local objective adds (mu / 2) * ||w - w_global||^2.

In a suite, `proximal_scope: task` (the default) pulls back only the tensors the current task trains (its modality's
encoder and its head); `all` pulls every tensor, the other tasks' too. Measured in the approach grid, `all` with Adam
damages the model: a tensor the task does not train gets only the tiny proximal gradient, which Adam normalises into
full-size steps.

The proximal term keeps each silo's model near the round's global model, which bounds client drift on non-IID
data; the server half is FedAvg's. FedMEKI's code uses mu = 1e-6; the usual default elsewhere is 0.01.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedmeki_core.algorithms.base import AlgorithmEntry, ClientHalf, LocalSettings, ProgressCallback, RoundContext
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
        self._scope = str(options["proximal_scope"])
        self._anchors: dict[int, torch.Tensor] = {}  # parameter id -> its value in the round's global model

    def begin(self, model: nn.Module, context: RoundContext) -> None:
        # The round's global values, not those a suite's earlier task left: tasks that share an encoder train in
        # turn, and each must be pulled back to w_global.
        self._anchors = {
            id(p): context.global_tensors[name].to(p.device, p.dtype)
            for name, p in model.named_parameters()
            if name in context.global_tensors
        }

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
        from fedmeki_core.models.build import used_parameters

        scope = used_parameters(model) if self._scope == "task" else list(model.parameters())
        pairs = [(p, self._anchors[id(p)]) for p in scope if p.requires_grad and id(p) in self._anchors]

        def proximal(_features: torch.Tensor) -> torch.Tensor:
            return 0.5 * self._mu * torch.stack([((p - g) ** 2).sum() for p, g in pairs]).sum()

        return run_local_epochs(model, data, settings, device, progress, self._optimizer, proximal)


class _FedProxEntry(AlgorithmEntry):
    def validate_options(self, options: Mapping[str, Any]) -> None:
        super().validate_options(options)
        validate_fedavg_options(self.name, options)
        if float(options.get("mu", 0.01)) < 0:
            raise InvalidInputError("fedprox option 'mu' must be non-negative")
        if options.get("proximal_scope", "all") not in ("all", "task"):
            raise InvalidInputError("fedprox option 'proximal_scope' must be 'all' or 'task'")


FEDPROX = _FedProxEntry(
    name="fedprox",
    description="FedAvg with a proximal term (mu / 2) ||w - w_global||^2 in each silo's local objective",
    defaults={"mu": 0.01, "proximal_scope": "task", "weighted": True, "server_learning_rate": 1.0, "optimizer": "adam"},
    client=FedProxClient,
    server=FedAvgServer,
)
