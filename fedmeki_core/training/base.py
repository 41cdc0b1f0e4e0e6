"""What a client half is: the settings it trains with, the round it sees, and the hooks the agent calls."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedmeki_core.tasks.dataset import ArrayDataset

ProgressCallback = Callable[[int, int, float], None]  # (step, total steps, running loss)


@dataclass(frozen=True)
class LocalSettings:
    """What the client half needs from the job spec."""

    local_epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    options: Mapping[str, Any] = field(default_factory=dict)
    # The silo's own choices, for its hardware: at most this many samples per forward pass (gradients are
    # accumulated up to batch_size, so the result does not change), and CUDA autocast to this dtype.
    micro_batch_size: int | None = None
    autocast: str = "off"  # "off", "bf16" or "fp16" (CUDA only)


@dataclass
class RoundContext:
    """What a client half sees of its round beyond the data, and what it leaves for the silo's next round.

    `state` is this silo's own tensors for the job from its previous round (empty at first); the agent stores
    what the client half leaves in it, so it survives restarts and is never sent anywhere.
    """

    global_tensors: Mapping[str, torch.Tensor]  # the round's global values of the model tensors (float32, CPU)
    extras: Mapping[str, torch.Tensor]  # the checkpoint's algorithm tensors, by their full names
    state: dict[str, torch.Tensor]
    extra_deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # to upload, one per extra
    # The model delta is uploaded times this (FedNova sends its delta per local step), declaring `local_steps`.
    delta_scale: float = 1.0
    local_steps: int | None = None
    # Model tensors this silo does not train this round (it has no data for their tasks): they must not move.
    untrained: frozenset[str] = frozenset()


def local_steps(settings: LocalSettings, num_samples: int) -> int:
    """The optimiser steps the shared local loop takes on `num_samples` samples: epochs x batches per epoch."""
    return settings.local_epochs * -(-num_samples // settings.batch_size)


class ClientAlgorithm(Protocol):
    """Trains the global model on the silo's data; the agent turns the result into a delta.

    A job trains `train` once per task (a suite's tasks in turn), between one `begin` and one `finish`.
    """

    def begin(self, model: nn.Module, context: RoundContext) -> None:
        """Before any training of the round (the model holds the global weights)."""
        ...

    def train(
        self,
        model: nn.Module,
        data: ArrayDataset,
        settings: LocalSettings,
        device: torch.device,
        progress: ProgressCallback | None = None,
    ) -> dict[str, float]:
        """Train `model` in place; return training metrics."""
        ...

    def finish(self, model: nn.Module, context: RoundContext) -> None:
        """After the round's training: fill `context.extra_deltas` and `context.state`."""
        ...

    def personalised(
        self, model: nn.Module, task: str, data: ArrayDataset, settings: LocalSettings, device: torch.device
    ) -> nn.Module | None:
        """The silo's personalised model for `task` to evaluate besides the global one, or None (most do not)."""
        ...


class ClientHalf:
    """Defaults for the hooks most client halves do not need."""

    def begin(self, model: nn.Module, context: RoundContext) -> None:
        return None

    def finish(self, model: nn.Module, context: RoundContext) -> None:
        return None

    def personalised(
        self, model: nn.Module, task: str, data: ArrayDataset, settings: LocalSettings, device: torch.device
    ) -> nn.Module | None:
        return None
