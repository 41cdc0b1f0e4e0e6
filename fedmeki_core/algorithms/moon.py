"""MOON (Li et al. 2021): model-contrastive learning keeps each silo's representation near the global model's.

Each batch adds mu * l_con to the loss, with z the representation the local model feeds its head, z_glob the
round's global model's and z_prev the silo's own model from its previous round (job state; absent in a silo's
first round, when the term is zero):

    l_con = -log( exp(cos(z, z_glob) / tau) / (exp(cos(z, z_glob) / tau) + exp(cos(z, z_prev) / tau)) )

The representation is the input of the model's classification head. The server half is FedAvg's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmeki_core.algorithms.fedavg import FedAvgFamilyEntry, FedAvgServer
from fedmeki_core.errors import InvalidInputError


class _MoonEntry(FedAvgFamilyEntry):
    def validate_options(self, options: Mapping[str, Any]) -> None:
        super().validate_options(options)
        if float(options.get("mu", 1.0)) < 0:
            raise InvalidInputError("moon option 'mu' must be non-negative")
        if float(options.get("temperature", 0.5)) <= 0:
            raise InvalidInputError("moon option 'temperature' must be positive")


MOON = _MoonEntry(
    name="moon",
    description="FedAvg whose silos add a model-contrastive loss: representations near the global model's, "
    "away from their previous round's",
    defaults={"mu": 1.0, "temperature": 0.5, "weighted": True, "server_learning_rate": 1.0, "optimizer": "adam"},
    client="fedmeki_core.training.moon:MoonClient",
    server=FedAvgServer,
)
