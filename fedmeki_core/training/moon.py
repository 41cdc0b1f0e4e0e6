"""MOON's client half: the shared loop plus mu * l_con (see fedmeki_core/algorithms/moon.py)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.models.build import exchanged_state, restore_tensors, store_tensors, task_view
from fedmeki_core.models.encoders import TaskView
from fedmeki_core.training.base import ClientHalf, LocalSettings, ProgressCallback, RoundContext
from fedmeki_core.training.local_training import run_local_epochs

if TYPE_CHECKING:
    from fedmeki_core.tasks.dataset import ArrayDataset

_PREVIOUS = "moon.previous/"


def head_of(model: nn.Module) -> nn.Module:
    """The classification head of a one-task model (a suite's task view, or a model with a `head`)."""
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
        store_tensors(model, context.state, _PREVIOUS)
        self._global = self._previous = None
