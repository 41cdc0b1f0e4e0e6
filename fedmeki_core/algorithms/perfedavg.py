"""Per-FedAvg, first-order (Fallah et al. 2020), as PPPML-HMI uses it: a global model that adapts in one step.

Each local step takes two batches: a trial step w' = w - alpha * grad f(w; D) on the first, then the model moves
by w <- w - beta * grad f(w'; D') on the second (beta is the job's learning rate; plain SGD, as in the paper).
A silo evaluates both the global model (eval_*) and its personalised one, the global model after one step of
alpha on a batch of its own training data (personal_eval_*). The server half is FedAvg's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedmeki_core.algorithms.base import ClientHalf, LocalSettings, ProgressCallback
from fedmeki_core.algorithms.fedavg import FedAvgFamilyEntry, FedAvgServer
from fedmeki_core.errors import InvalidInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedmeki_core.tasks.dataset import ArrayDataset


def _sgd_step(model: nn.Module, loss: torch.Tensor, learning_rate: float) -> None:
    import torch

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
        import torch

        from fedmeki_core.algorithms.local_training import model_loss

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
        import torch

        from fedmeki_core.algorithms.local_training import model_loss
        from fedmeki_core.models.build import task_view

        view = task_view(copy.deepcopy(model), task)
        features, labels = _tensors(data, device)
        batch = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed))[: settings.batch_size]
        batch = batch.to(device)
        view.train()
        _sgd_step(view, model_loss(view, features[batch], labels[batch]), self._alpha)
        return view


def _tensors(data: ArrayDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    targets = data.labels if data.masks is None else data.masks
    return torch.from_numpy(data.features).to(device), torch.from_numpy(targets).to(device)


class _PerFedAvgEntry(FedAvgFamilyEntry):
    def validate_options(self, options: Mapping[str, Any]) -> None:
        super().validate_options(options)
        if float(options.get("alpha", 0.01)) <= 0:
            raise InvalidInputError("perfedavg option 'alpha' must be positive")


PERFEDAVG = _PerFedAvgEntry(
    name="perfedavg",
    description="Per-FedAvg (first order): a global model trained to adapt to each silo in one step of alpha",
    defaults={"alpha": 0.01, "weighted": True, "server_learning_rate": 1.0},
    client=PerFedAvgClient,
    server=FedAvgServer,
)
