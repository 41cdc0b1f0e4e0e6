"""FedNova (Wang et al. 2020): normalised averaging, so silos taking more local steps do not pull the model their way.

With plain SGD, silo i's delta after tau_i local steps is about tau_i times its average step; FedAvg's mean then
weighs silos by how many steps they took, not only by their data (the objective inconsistency FedNova removes).
Each silo uploads its delta divided by tau_i and declares tau_i in the delta's header
(`fedmeki.local_steps`); the server moves by

    x <- x + server_learning_rate * tau_eff * sum_i p_i (delta_i / tau_i),    tau_eff = sum_i p_i tau_i

with p_i the silos' weights in the round (sample counts by default). With equal tau_i this is FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmeki_core.algorithms.base import ServerState
from fedmeki_core.algorithms.fedavg import FedAvgFamilyEntry, WeightedServer
from fedmeki_core.errors import InvalidUpdateError


class FedNovaServer(WeightedServer):
    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self._effective_steps = 0.0

    def begin_round(self, mean_local_steps: float | None) -> None:
        if mean_local_steps is None:
            raise InvalidUpdateError("fednova: the round's updates declare no local steps (fedmeki.local_steps)")
        self._effective_steps = mean_local_steps

    def apply(
        self, name: str, current: np.ndarray[Any, Any], mean_delta: np.ndarray[Any, Any], state: ServerState
    ) -> np.ndarray[Any, Any]:
        mean_delta *= np.asarray(self._server_lr * self._effective_steps, dtype=mean_delta.dtype)
        mean_delta += current
        return mean_delta


FEDNOVA = FedAvgFamilyEntry(
    name="fednova",
    description="Normalised averaging: silos send their delta per local step, the server scales by the mean steps",
    # The normalisation is exact for plain SGD (the paper's a_i = tau_i); other optimisers change a_i.
    defaults={"weighted": True, "server_learning_rate": 1.0, "optimizer": "sgd"},
    client="fedmeki_core.training.fednova:FedNovaClient",
    server=FedNovaServer,
)
