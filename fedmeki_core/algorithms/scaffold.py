"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each silo's drift away from the global direction.

The server's control variate c travels in the checkpoint as one extra tensor per model tensor
("algorithm/scaffold.control/<name>", zero at first); each silo keeps its own c_i in its job state. Local steps
follow g + c - c_i (as the gradient of the extra loss term <c - c_i, w>), and afterwards, with K local steps of
learning rate lr (option II of the paper):

    c_i+ = c_i - c + (x - y_i) / (K lr)        upload: y_i - x, and c_i+ - c_i for the extra tensors

The server moves x by server_learning_rate times the mean model delta, and c by the mean control delta (the
paper's |S|/N factor is 1: every eligible silo takes part in a round here). Buffers (BatchNorm statistics) are not
trained by gradients: their control variates stay zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmeki_core.algorithms.base import (
    EXTRA_PREFIX,
    ClientHalf,
    LocalSettings,
    ProgressCallback,
    RoundContext,
    ServerState,
    local_steps,
)
from fedmeki_core.algorithms.fedavg import FedAvgFamilyEntry, FedAvgServer

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedmeki_core.tasks.dataset import ArrayDataset

SLOT = "scaffold.control"
_CONTROL = f"{EXTRA_PREFIX}{SLOT}/"
_OWN = "scaffold.own/"  # this silo's c_i, in its job state


class ScaffoldClient(ClientHalf):
    def __init__(self, options: Mapping[str, Any]) -> None:
        self._optimizer = str(options["optimizer"])
        self._steps = 0
        self._learning_rate = 0.0
        self._corrections: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, c - c_i) on its device

    def begin(self, model: nn.Module, context: RoundContext) -> None:
        import torch

        self._steps = 0
        self._corrections = []
        for name, parameter in model.named_parameters():
            if name not in context.global_tensors or name in context.untrained:
                continue
            server = context.extras[f"{_CONTROL}{name}"]
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
        import torch

        from fedmeki_core.algorithms.local_training import run_local_epochs

        corrections = self._corrections

        def correction(_features: torch.Tensor) -> torch.Tensor:  # its gradient is c - c_i
            return torch.stack([(parameter * c).sum() for parameter, c in corrections]).sum()

        self._steps += local_steps(settings, len(data))
        self._learning_rate = settings.learning_rate
        return run_local_epochs(model, data, settings, device, progress, self._optimizer, correction)

    def finish(self, model: nn.Module, context: RoundContext) -> None:
        import torch

        trained = dict(model.named_parameters())
        scale = 1.0 / (max(self._steps, 1) * self._learning_rate)
        for name, start in context.global_tensors.items():
            server = context.extras[f"{_CONTROL}{name}"]
            own = context.state.get(f"{_OWN}{name}", torch.zeros_like(server))
            if name in trained and name not in context.untrained:
                local = trained[name].detach().to("cpu", torch.float32)
                updated = own - server + (start - local) * scale
            else:
                updated = own
            context.extra_deltas[f"{_CONTROL}{name}"] = updated - own
            context.state[f"{_OWN}{name}"] = updated


class ScaffoldServer(FedAvgServer):
    def apply(
        self, name: str, current: np.ndarray[Any, Any], mean_delta: np.ndarray[Any, Any], state: ServerState
    ) -> np.ndarray[Any, Any]:
        if name.startswith(_CONTROL):  # c += mean(c_i+ - c_i), whatever the server learning rate
            mean_delta += current
            return mean_delta
        return super().apply(name, current, mean_delta, state)


SCAFFOLD = FedAvgFamilyEntry(
    name="scaffold",
    description="Control variates (server c in the checkpoint, silo c_i kept locally) correct client drift",
    # The paper's local steps are plain SGD; Adam would rescale the correction.
    defaults={"weighted": True, "server_learning_rate": 1.0, "optimizer": "sgd"},
    client=ScaffoldClient,
    server=ScaffoldServer,
    extra_slots=(SLOT,),
)
