"""The local optimisation loop client halves share: minibatch epochs of cross-entropy on the silo's device.

Run by each rank of a torch.distributed job (a silo with several devices, silo_agent/distributed.py), every rank
takes its share of each batch and the ranks sum their gradients before each step: the same update as one process
on the whole batch, up to the order of float additions. A model sharded by FSDP (silo_agent/sharding.py) has its
gradients summed by FSDP's reduce-scatter, which every rank must join: each rank then runs as many passes per batch
as the rank with the most, filling in with passes that weigh nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fedmeki_core.training.base import LocalSettings, ProgressCallback, local_steps

if TYPE_CHECKING:
    from fedmeki_core.tasks.dataset import ArrayDataset


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BUCKET_ELEMENTS = 1 << 24  # gradients summed across ranks per all-reduce: 64 MiB of float32, as DDP's buckets


def model_loss(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A model with its own training loss (the injection model's, on answer tokens) says so by `batch_loss`."""
    own = getattr(model, "batch_loss", None)
    if own is not None:
        loss: torch.Tensor = own(features, labels)
        return loss
    return nn.functional.cross_entropy(model(features).float(), labels)


def _weight(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> int:
    """What samples weigh in a batch's loss: their count, or for a model whose loss is a mean over tokens (a causal
    LM's over answer tokens) the tokens' (`loss_terms`), so that a batch split into micro-batches or across ranks
    has the gradient of the whole batch."""
    terms = getattr(model, "loss_terms", None)
    return int(terms(features, labels)) if terms is not None else len(features)


def data_parallel_rank() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed job this process is a rank of; (0, 1) when it trains alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sum_across_ranks(params: Sequence[torch.Tensor], loss_sum: float) -> float:
    """Sum each parameter's gradient and the batch's loss over the ranks (what DDP does, without its module wrapper:
    the loop calls models' own `batch_loss`, which DDP's forward would not see), in flat buckets of at most
    _BUCKET_ELEMENTS. A parameter no rank gave a gradient keeps none: the optimiser skips it, as in one process."""
    device = params[0].device if params else torch.device("cpu")
    flags = torch.tensor([*(p.grad is not None for p in params), loss_sum], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(flags)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    start = 0
    while start < len(grads):
        end, size = start + 1, grads[start].numel()
        while end < len(grads) and size + grads[end].numel() <= _BUCKET_ELEMENTS:
            size += grads[end].numel()
            end += 1
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads[start:end]])
        torch.distributed.all_reduce(flat)
        offset = 0
        for grad in grads[start:end]:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        start = end
    for param, grad, flag in zip(params, grads, flags[:-1].tolist(), strict=True):
        param.grad = grad if flag > 0 else None
    return float(flags[-1])


def _sharded(params: list[nn.Parameter]) -> bool:
    return any(isinstance(p, DTensor) for p in params)


def _passes(
    model: nn.Module, features: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, micro: int, sharded: bool
) -> list[tuple[torch.Tensor, bool]]:
    """This rank's micro-batches of a batch, each with whether it weighs in the loss. Sharded, every rank runs as
    many as rank 0 (which has the most), a part with nothing to learn standing in for by the batch's first sample
    that has some (a pass that weighs nothing: its loss times 0, never the NaN of a mean over no tokens)."""
    rank, ranks = data_parallel_rank()
    parts = torch.split(index[rank::ranks], micro)
    if not sharded:
        return [(part, True) for part in parts]
    singles = (index[i : i + 1] for i in range(len(index)))
    filler = next((one for one in singles if _weight(model, features[one], labels[one]) > 0), None)
    if filler is None:  # the whole batch has nothing to learn: every rank skips it alike
        return []
    weighs = [_weight(model, features[part], labels[part]) > 0 for part in parts]
    passes = [(part if weight else filler, weight) for part, weight in zip(parts, weighs, strict=True)]
    return passes + [(filler, False)] * (-(-len(index[0::ranks]) // micro) - len(passes))


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
    # segmentation trains on masks, regression on its real-valued targets
    targets = data.targets if data.targets is not None else data.labels if data.masks is None else data.masks
    labels = torch.from_numpy(targets).to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    total_steps = local_steps(settings, len(data))
    micro = settings.micro_batch_size or settings.batch_size
    dtype = _AUTOCAST.get(settings.autocast) if device.type == "cuda" else None
    # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    _, ranks = data_parallel_rank()
    sharded = _sharded(params)
    step, loss_sum, loss_count = 0, 0.0, 0
    model.train()
    for _ in range(settings.local_epochs):
        order = torch.randperm(len(data), generator=generator).to(device)
        loss_sum, loss_count = 0.0, 0
        for start in range(0, len(data), settings.batch_size):
            index = order[start : start + settings.batch_size]
            whole = _weight(model, features[index], labels[index])
            optimizer.zero_grad(set_to_none=True)
            batch_loss = 0.0
            # gradient accumulation over this rank's share of the batch: the same update as the whole batch
            for part, weighs in _passes(model, features, labels, index, micro, sharded):
                share = _weight(model, features[part], labels[part]) / max(whole, 1) if weighs else 0.0
                if share == 0 and not sharded:  # nothing to learn here (prompts whose answers were cut off)
                    continue
                with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                    loss = model_loss(model, features[part], labels[part])
                # FSDP averages the ranks' gradients: times the world size, the average is their sum
                scaled = loss * (share * ranks if sharded else share)
                if penalty is not None:
                    scaled = scaled + penalty(features[part]) * (len(part) / len(index))
                (scaled if scaler is None else scaler.scale(scaled)).backward()  # type: ignore[no-untyped-call]
                batch_loss += float(loss.detach()) * share * whole
            if ranks == 1:
                loss_sum += batch_loss
            elif sharded:  # FSDP summed the gradients: the loss alone is left to sum
                total = torch.tensor([batch_loss], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(total)
                loss_sum += float(total)
            else:
                loss_sum += sum_across_ranks(params, batch_loss)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            loss_count += whole
            step += 1
            if progress is not None:
                progress(step, total_steps, loss_sum / max(loss_count, 1))
    return {"train_loss": loss_sum / max(loss_count, 1)}
