"""The two halves of an FL algorithm, and how the registry describes one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.option_types import has_type_of

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedmeki_core.tasks.dataset import ArrayDataset

OPTIMIZERS = ("adam", "sgd")  # what the shared local loop can run
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


class ClientAlgorithm(Protocol):
    """Trains the global model on the silo's data; the agent turns the result into a delta."""

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


ServerState = dict[str, "np.ndarray[Any, Any]"]  # one tensor's server-side arrays by slot, e.g. {"m": ..., "v": ...}


class ServerAlgorithm(Protocol):
    """Turns the weighted mean of the silos' deltas into the next global model, tensor by tensor."""

    def update_weight(self, num_samples: int) -> float:
        """The weight of one silo's delta in the round's weighted mean."""
        ...

    def apply(
        self, name: str, current: np.ndarray[Any, Any], mean_delta: np.ndarray[Any, Any], state: ServerState
    ) -> np.ndarray[Any, Any]:
        """The next global value of tensor `name` (same dtype as `current`); may reuse `mean_delta`'s memory.

        `state` holds what this tensor's server half kept from the previous round (empty in the first round);
        the method updates it in place. The coordinator saves it with each checkpoint, so it survives restarts.
        """
        ...


@dataclass(frozen=True)
class AlgorithmEntry:
    name: str
    description: str
    defaults: Mapping[str, Any]  # every option with its default; the type of the default is the option's type
    client: Callable[[Mapping[str, Any]], ClientAlgorithm]
    server: Callable[[Mapping[str, Any]], ServerAlgorithm]

    def resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with `options`, checked for unknown names and wrong types."""
        self.validate_options(options)
        return {**self.defaults, **options}

    def validate_options(self, options: Mapping[str, Any]) -> None:
        for key, value in options.items():
            if key not in self.defaults:
                known = ", ".join(sorted(self.defaults)) or "none"
                raise InvalidInputError(f"{self.name} has no option {key!r} (options: {known})")
            if not has_type_of(value, self.defaults[key]):
                expected = type(self.defaults[key]).__name__
                raise InvalidInputError(f"{self.name} option {key!r} must be {expected}, got {value!r}")
