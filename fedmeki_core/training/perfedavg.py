"""Per-FedAvg's client half: a trial step of alpha, then the outer step (see fedmeki_core/algorithms/perfedavg.py)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.models.build import task_view
from fedmeki_core.training.base import ClientHalf, LocalSettings, ProgressCallback
from fedmeki_core.training.local_training import model_loss

if TYPE_CHECKING:
    from torch import nn

    from fedmeki_core.tasks.dataset import ArrayDataset


def _sgd_step(model: nn.Module, loss: torch.Tensor, learning_rate: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.sub_(g, alpha=learning_rate)


class PerFedAvgClient(ClientHalf):
    def __init__(self, options: Mapping[str, Any]) -> None:
        self._alpha = float(options["alpha"])

    def train(
        self,
        model: nn.Module,
        data: ArrayDataset,
        settings: LocalSettings,
        device: torch.device,
        progress: ProgressCallback | None = None,
    ) -> dict[str, float]:
        features, labels = _tensors(data, device)
        trial = copy.deepcopy(model)  # w', rebuilt from w at every step
        params = [p for p in model.parameters() if p.requires_grad]
        trial_params = [p for p in trial.parameters() if p.requires_grad]
        if len(data) < 2:
            raise InvalidInputError("perfedavg needs at least 2 training samples: each step takes two batches")
        generator = torch.Generator().manual_seed(settings.seed)
        # Each batch of batch_size samples is split in two: the trial step's half and the outer step's half.
        full, rest = divmod(len(data), settings.batch_size)
        total, step, loss_sum = settings.local_epochs * (full + (rest >= 2)), 0, 0.0
        model.train()
        trial.train()
        for _ in range(settings.local_epochs):
            order = torch.randperm(len(data), generator=generator).to(device)
            for start in range(0, len(data), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                if len(batch) < 2:  # a last batch of one sample cannot be split
                    continue
                first, second = batch[: len(batch) // 2], batch[len(batch) // 2 :]
                with torch.no_grad():
                    for t, p in zip(trial_params, params, strict=True):
                        t.copy_(p)
                _sgd_step(trial, model_loss(trial, features[first], labels[first]), self._alpha)
                outer = model_loss(trial, features[second], labels[second])
                grads = torch.autograd.grad(outer, trial_params, allow_unused=True)
                with torch.no_grad():  # first order: the gradient at w' moves w
                    for p, g in zip(params, grads, strict=True):
                        if g is not None:
                            p.sub_(g, alpha=settings.learning_rate)
                step += 1
                loss_sum += float(outer.detach())
                if progress is not None:
                    progress(step, total, loss_sum / step)
        return {"train_loss": loss_sum / max(step, 1)}

    def personalised(
        self, model: nn.Module, task: str, data: ArrayDataset, settings: LocalSettings, device: torch.device
    ) -> nn.Module | None:
        view = task_view(copy.deepcopy(model), task)
        features, labels = _tensors(data, device)
        batch = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed))[: settings.batch_size]
        batch = batch.to(device)
        view.train()
        _sgd_step(view, model_loss(view, features[batch], labels[batch]), self._alpha)
        return view


def _tensors(data: ArrayDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    targets = data.labels if data.masks is None else data.masks
    return torch.from_numpy(data.features).to(device), torch.from_numpy(targets).to(device)
