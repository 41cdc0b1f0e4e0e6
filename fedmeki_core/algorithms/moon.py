"""MOON (Li et al. 2021): model-contrastive learning keeps each silo's representation near the global model's.

Each batch adds mu * l_con to the loss, with z the representation the local model feeds its head, z_glob the
round's global model's and z_prev the silo's own model from its previous round (job state; absent in a silo's
first round, when the term is zero):

    l_con = -log( exp(cos(z, z_glob) / tau) / (exp(cos(z, z_glob) / tau) + exp(cos(z, z_prev) / tau)) )

The representation is the input of the model's classification head. The server half is FedAvg's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedmeki_core.algorithms.base import ClientHalf, LocalSettings, ProgressCallback, RoundContext
from fedmeki_core.algorithms.fedavg import FedAvgFamilyEntry, FedAvgServer
from fedmeki_core.errors import InvalidInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedmeki_core.tasks.dataset import ArrayDataset

_PREVIOUS = "moon.previous/"


def head_of(model: nn.Module) -> nn.Module:
    """The classification head of a one-task model (a suite's task view, or a model with a `head`)."""
    from torch import nn

    from fedmeki_core.models.encoders import TaskView

    if isinstance(model, TaskView):
        head: nn.Module = model.model.heads[model.task]
        return head
    found = getattr(model, "head", None)
    if not isinstance(found, nn.Module):
        raise InvalidInputError(f"moon needs a model with a classification head; {type(model).__name__} has none")
    return found


class _Representation:
    """Captures what a model feeds its head in each forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self._handle = head_of(model).register_forward_pre_hook(self._capture)

    def _capture(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.value = inputs[0].flatten(1)

    def close(self) -> None:
        self._handle.remove()


class MoonClient(ClientHalf):
    def __init__(self, options: Mapping[str, Any]) -> None:
        self._optimizer = str(options["optimizer"])
        self._mu = float(options["mu"])
        self._temperature = float(options["temperature"])
        self._global: nn.Module | None = None
        self._previous: nn.Module | None = None

    def begin(self, model: nn.Module, context: RoundContext) -> None:
        from fedmeki_core.models.build import exchanged_state, restore_tensors

        self._global = copy.deepcopy(model).eval()  # the model holds the round's global weights now
        self._previous = None
        if all(f"{_PREVIOUS}{name}" in context.state for name in exchanged_state(model)):
            self._previous = copy.deepcopy(model).eval()
            restore_tensors(self._previous, context.state, _PREVIOUS)

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
        from fedmeki_core.models.build import task_view

        if self._previous is None:  # a silo's first round: no negative pair, the term is zero
            return run_local_epochs(model, data, settings, device, progress, self._optimizer)
        assert self._global is not None  # begin() comes first
        task = getattr(model, "task", "")
        views = [task_view(m, task) if task else m for m in (self._global, self._previous)]
        local, positive, negative = (_Representation(m) for m in (model, *views))

        def contrastive(features: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                for view in views:
                    view(features)
            z, z_glob, z_prev = (r.value for r in (local, positive, negative))
            assert z is not None and z_glob is not None and z_prev is not None
            similarities = torch.stack(
                [torch.nn.functional.cosine_similarity(z.float(), other.float(), dim=-1) for other in (z_glob, z_prev)],
                dim=-1,
            )
            target = torch.zeros(len(features), dtype=torch.long, device=features.device)  # the global one
            return self._mu * torch.nn.functional.cross_entropy(similarities / self._temperature, target)

        try:
            return run_local_epochs(model, data, settings, device, progress, self._optimizer, contrastive)
        finally:
            for representation in (local, positive, negative):
                representation.close()

    def finish(self, model: nn.Module, context: RoundContext) -> None:
        from fedmeki_core.models.build import store_tensors

        store_tensors(model, context.state, _PREVIOUS)
        self._global = self._previous = None


class _MoonEntry(FedAvgFamilyEntry):
    def validate_options(self, options: Mapping[str, Any]) -> None:
        super().validate_options(options)
        if float(options.get("mu", 1.0)) < 0:
            raise InvalidInputError("moon option 'mu' must be non-negative")
        if float(options.get("temperature", 0.5)) <= 0:
            raise InvalidInputError("moon option 'temperature' must be positive")


MOON = _MoonEntry(
    name="moon",
    description="FedAvg whose silos add a model-contrastive loss: representations near the global model's, "
    "away from their previous round's",
    defaults={"mu": 1.0, "temperature": 0.5, "weighted": True, "server_learning_rate": 1.0, "optimizer": "adam"},
    client=MoonClient,
    server=FedAvgServer,
)
