"""FedProx's client half: the shared loop plus (mu / 2) ||w - w_global||^2 (see fedmeki_core/algorithms/fedprox.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fedmeki_core.models.build import used_parameters
from fedmeki_core.training.base import ClientHalf, LocalSettings, ProgressCallback, RoundContext
from fedmeki_core.training.local_training import run_local_epochs

if TYPE_CHECKING:
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
        scope = used_parameters(model) if self._scope == "task" else list(model.parameters())
        pairs = [(p, self._anchors[id(p)]) for p in scope if p.requires_grad and id(p) in self._anchors]

        def proximal(_features: torch.Tensor) -> torch.Tensor:
            return 0.5 * self._mu * torch.stack([((p - g) ** 2).sum() for p, g in pairs]).sum()

        return run_local_epochs(model, data, settings, device, progress, self._optimizer, proximal)
