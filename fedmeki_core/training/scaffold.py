"""SCAFFOLD's client half: steps follow g + c - c_i, c_i kept in the job state (algorithms/scaffold.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fedmeki_core.algorithms.scaffold import CONTROL_PREFIX
from fedmeki_core.training.base import ClientHalf, LocalSettings, ProgressCallback, RoundContext, local_steps
from fedmeki_core.training.local_training import run_local_epochs

if TYPE_CHECKING:
    from torch import nn

    from fedmeki_core.tasks.dataset import ArrayDataset

_OWN = "scaffold.own/"  # this silo's c_i, in its job state


class ScaffoldClient(ClientHalf):
    def __init__(self, options: Mapping[str, Any]) -> None:
        self._optimizer = str(options["optimizer"])
        self._steps = 0
        self._learning_rate = 0.0
        self._corrections: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, c - c_i) on its device

    def begin(self, model: nn.Module, context: RoundContext) -> None:
        self._steps = 0
        self._corrections = []
        for name, parameter in model.named_parameters():
            if name not in context.global_tensors or name in context.untrained:
                continue
            server = context.extras[f"{CONTROL_PREFIX}{name}"]
            own = context.state.get(f"{_OWN}{name}", torch.zeros_like(server))
            self._corrections.append((parameter, (server - own).to(parameter.device)))

    def train(
        self,
        model: nn.Module,
        data: ArrayDataset,
        settings: LocalSettings,
        device: torch.device,
        progress: ProgressCallback | None = None,
    ) -> dict[str, float]:
        corrections = self._corrections

        def correction(_features: torch.Tensor) -> torch.Tensor:  # its gradient is c - c_i
            return torch.stack([(parameter * c).sum() for parameter, c in corrections]).sum()

        self._steps += local_steps(settings, len(data))
        self._learning_rate = settings.learning_rate
        return run_local_epochs(model, data, settings, device, progress, self._optimizer, correction)

    def finish(self, model: nn.Module, context: RoundContext) -> None:
        trained = dict(model.named_parameters())
        scale = 1.0 / (max(self._steps, 1) * self._learning_rate)
        for name, start in context.global_tensors.items():
            server = context.extras[f"{CONTROL_PREFIX}{name}"]
            own = context.state.get(f"{_OWN}{name}", torch.zeros_like(server))
            if name in trained and name not in context.untrained:
                local = trained[name].detach().to("cpu", torch.float32)
                updated = own - server + (start - local) * scale
            else:
                updated = own
            context.extra_deltas[f"{CONTROL_PREFIX}{name}"] = updated - own
            context.state[f"{_OWN}{name}"] = updated
