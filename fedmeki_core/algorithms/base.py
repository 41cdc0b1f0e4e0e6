"""The two halves of an FL algorithm, and how the registry describes one."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedmeki_core.algorithms.robust import ROBUST_OPTION, robust_aggregation
from fedmeki_core.algorithms.update_limits import LIMIT_OPTIONS, update_limits
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.option_types import has_type_of, shown

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


# Tensors an algorithm adds to the checkpoint besides the model's (e.g. SCAFFOLD's server control variates) are
# named "algorithm/<slot>/<model tensor>"; model tensor names never contain a "/".
EXTRA_PREFIX = "algorithm/"


def extra_of(extra_name: str) -> str:
    """The model tensor an extra tensor belongs to: "algorithm/<slot>/<name>" -> "<name>"."""
    return extra_name.split("/", 2)[2]


def personal_names(patterns: Iterable[str], names: Iterable[str]) -> set[str]:
    """The tensor names a job's `algorithm.personal` glob patterns select."""
    patterns = list(patterns)
    return {name for name in names if any(fnmatchcase(name, pattern) for pattern in patterns)}


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


ServerState = dict[str, "np.ndarray[Any, Any]"]  # one tensor's server-side arrays by slot, e.g. {"m": ..., "v": ...}


class ServerAlgorithm(Protocol):
    """Turns the weighted mean of the silos' deltas into the next global model, tensor by tensor."""

    def update_weight(self, num_samples: int) -> float:
        """The weight of one silo's delta in the round's weighted mean."""
        ...

    def begin_round(self, mean_local_steps: float | None) -> None:
        """Before the round's tensors: the weighted mean of the local steps the updates declared (None: none did)."""
        ...

    def apply(
        self, name: str, current: np.ndarray[Any, Any], mean_delta: np.ndarray[Any, Any], state: ServerState
    ) -> np.ndarray[Any, Any]:
        """The next global value of tensor `name`; may reuse `mean_delta`'s memory (float64, as the coordinator
        accumulates), and may be float64: the coordinator casts it to `current`'s dtype and checks it is finite.

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
    extra_slots: tuple[str, ...] = ()  # e.g. ("scaffold.control",): one extra tensor per model tensor and slot

    def extra_names(self, model_tensors: Iterable[str]) -> list[str]:
        """The full names of the extra tensors a checkpoint of this algorithm holds besides `model_tensors`."""
        names = list(model_tensors)
        return [f"{EXTRA_PREFIX}{slot}/{name}" for slot in self.extra_slots for name in names]

    def check_manifest(self, names: Iterable[str]) -> None:
        """Initial weights must carry this algorithm's extra tensors (zeros), as `fedmeki job submit` writes them."""
        names = set(names)
        model = sorted(name for name in names if not name.startswith(EXTRA_PREFIX))
        missing = [name for name in self.extra_names(model) if name not in names]
        unexpected = sorted(names - set(model) - set(self.extra_names(model)))
        if missing:
            raise InvalidInputError(
                f"{self.name} needs {len(missing)} extra tensors in the initial weights besides the model's, "
                f"e.g. {missing[0]!r} (zeros; submitting without a weights file adds them)"
            )
        if unexpected:
            raise InvalidInputError(
                f"the initial weights hold tensors {self.name} does not use, e.g. {unexpected[0]!r}"
            )

    def resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with `options`, checked for unknown names and wrong types."""
        self.validate_options(options)
        return {**self.defaults, **options}

    def validate_options(self, options: Mapping[str, Any]) -> None:
        robust_aggregation(options)  # every algorithm takes it: see fedmeki_core/algorithms/robust.py
        update_limits(options)  # and these: fedmeki_core/algorithms/update_limits.py
        for key, value in options.items():
            if key == ROBUST_OPTION or key in LIMIT_OPTIONS:
                continue
            if key not in self.defaults:
                known = ", ".join(sorted([*self.defaults, ROBUST_OPTION, *LIMIT_OPTIONS]))
                raise InvalidInputError(f"{self.name} has no option {shown(key)} (options: {known})")
            if not has_type_of(value, self.defaults[key]):
                expected = type(self.defaults[key]).__name__
                raise InvalidInputError(f"{self.name} option {key!r} must be {expected}, got {shown(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidInputError(f"{self.name} option {key!r} must be finite, got {shown(value)}")
