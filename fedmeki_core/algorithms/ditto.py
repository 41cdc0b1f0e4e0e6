"""Ditto (Li et al. 2021): FedAvg for the global model, plus a personal model each silo keeps to itself.

Each round the silo first trains its personal model v (kept in its job state; the global model at first) on its
own data with the proximal term (lambda / 2) ||v - w_global||^2, evaluates it on its held-out split (reported as
`personal_eval_*`), then trains the global model as FedAvg does. Only the global model's delta leaves the silo.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmeki_core.algorithms.fedavg import FedAvgFamilyEntry, FedAvgServer
from fedmeki_core.errors import InvalidInputError


class _DittoEntry(FedAvgFamilyEntry):
    def validate_options(self, options: Mapping[str, Any]) -> None:
        super().validate_options(options)
        if float(options.get("lambda", 0.1)) < 0:
            raise InvalidInputError("ditto option 'lambda' must be non-negative")
        if int(options.get("personal_epochs", 1)) < 1:
            raise InvalidInputError("ditto option 'personal_epochs' must be at least 1")


DITTO = _DittoEntry(
    name="ditto",
    description="FedAvg plus a personal model per silo, kept near the global one by (lambda / 2) ||v - w||^2",
    defaults={
        "lambda": 0.1,
        "personal_epochs": 1,
        "weighted": True,
        "server_learning_rate": 1.0,
        "optimizer": "adam",
    },
    client="fedmeki_core.training.ditto:DittoClient",
    server=FedAvgServer,
)
