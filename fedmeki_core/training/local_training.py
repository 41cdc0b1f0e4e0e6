"""The local optimisation loop client halves share: minibatch epochs of cross-entropy on the silo's device."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmeki_core.training.base import LocalSettings, ProgressCallback, local_steps

if TYPE_CHECKING:
    from fedmeki_core.tasks.dataset import ArrayDataset


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def model_loss(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A model with its own training loss (the injection model's, on answer tokens) says so by `batch_loss`."""
    own = getattr(model, "batch_loss", None)
    if own is not None:
        loss: torch.Tensor = own(features, labels)
        return loss
    return nn.functional.cross_entropy(model(features).float(), labels)


def run_local_epochs(
    model: nn.Module,
    data: ArrayDataset,
    settings: LocalSettings,
    device: torch.device,
    progress: ProgressCallback | None,
    optimizer_name: str,
    penalty: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    (
        """Minibatch epochs of the model's loss; `penalty(features)` (FedProx's proximal term, MOON's contrastive one)
    is added to each (micro-)batch's loss, right after the model's forward pass on those features."""
        ""
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
    else:
        optimizer = torch.optim.SGD(params, lr=settings.learning_rate)
    features = torch.from_numpy(data.features).to(device)
    targets = data.labels if data.masks is None else data.masks  # segmentation trains on masks
    labels = torch.from_numpy(targets).to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    total_steps = local_steps(settings, len(data))
    micro = settings.micro_batch_size or settings.batch_size
    dtype = _AUTOCAST.get(settings.autocast) if device.type == "cuda" else None
    # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    step, loss_sum, loss_count = 0, 0.0, 0
    model.train()
    for _ in range(settings.local_epochs):
        order = torch.randperm(len(data), generator=generator).to(device)
        loss_sum, loss_count = 0.0, 0
        for start in range(0, len(data), settings.batch_size):
            index = order[start : start + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            for part in torch.split(index, micro):  # gradient accumulation: the same update as one whole batch
                with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                    loss = model_loss(model, features[part], labels[part])
                scaled = loss * (len(part) / len(index))
                if penalty is not None:
                    scaled = scaled + penalty(features[part]) * (len(part) / len(index))
                (scaled if scaler is None else scaler.scale(scaled)).backward()  # type: ignore[no-untyped-call]
                loss_sum += float(loss.detach()) * len(part)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            loss_count += len(index)
            step += 1
            if progress is not None:
                progress(step, total_steps, loss_sum / loss_count)
    return {"train_loss": loss_sum / max(loss_count, 1)}
