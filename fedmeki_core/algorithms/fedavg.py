"""FedAvg (McMahan et al. 2017): local epochs at each silo; the server moves to the (sample-)weighted mean."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmeki_core.algorithms.base import OPTIMIZERS, AlgorithmEntry, ServerState
from fedmeki_core.errors import InvalidInputError


class WeightedServer:
    """What FedAvg's server half and those built on it share: sample-weighted (or uniform) means, a server lr."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self._weighted = bool(options["weighted"])
        self._server_lr = float(options["server_learning_rate"])

    def update_weight(self, num_samples: int) -> float:
        return float(num_samples) if self._weighted else 1.0

    def begin_round(self, mean_local_steps: float | None) -> None:
        return None


class FedAvgServer(WeightedServer):
    def apply(
        self, name: str, current: np.ndarray[Any, Any], mean_delta: np.ndarray[Any, Any], state: ServerState
    ) -> np.ndarray[Any, Any]:
        mean_delta *= self._server_lr  # in place: no new array (and no page faults) per tensor
        mean_delta += current
        return mean_delta


def validate_fedavg_options(name: str, options: Mapping[str, Any]) -> None:
    """The options FedAvg's halves share with the algorithms built on them."""
    if options.get("optimizer", "adam") not in OPTIMIZERS:
        raise InvalidInputError(f"{name} option 'optimizer' must be one of {', '.join(OPTIMIZERS)}")
    if float(options.get("server_learning_rate", 1.0)) <= 0:
        raise InvalidInputError(f"{name} option 'server_learning_rate' must be positive")


class FedAvgFamilyEntry(AlgorithmEntry):
    """An algorithm with FedAvg's options (weighted, server_learning_rate, optimizer), checked the same way."""

    def validate_options(self, options: Mapping[str, Any]) -> None:
        super().validate_options(options)
        validate_fedavg_options(self.name, options)


FEDAVG = FedAvgFamilyEntry(
    name="fedavg",
    description="Federated averaging: local epochs, then the sample-weighted mean of the silos' deltas",
    defaults={"weighted": True, "server_learning_rate": 1.0, "optimizer": "adam"},
    client="fedmeki_core.training.fedavg:FedAvgClient",
    server=FedAvgServer,
)
