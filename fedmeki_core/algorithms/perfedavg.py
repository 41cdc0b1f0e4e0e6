"""Per-FedAvg, first-order (Fallah et al. 2020), as PPPML-HMI uses it: a global model that adapts in one step.

Each local step takes two batches: a trial step w' = w - alpha * grad f(w; D) on the first, then the model moves
by w <- w - beta * grad f(w'; D') on the second (beta is the job's learning rate; plain SGD, as in the paper).
A silo evaluates both the global model (eval_*) and its personalised one, the global model after one step of
alpha on a batch of its own training data (personal_eval_*). The server half is FedAvg's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmeki_core.algorithms.fedavg import FedAvgFamilyEntry, FedAvgServer
from fedmeki_core.errors import InvalidInputError


class _PerFedAvgEntry(FedAvgFamilyEntry):
    def validate_options(self, options: Mapping[str, Any]) -> None:
        super().validate_options(options)
        if float(options.get("alpha", 0.01)) <= 0:
            raise InvalidInputError("perfedavg option 'alpha' must be positive")


PERFEDAVG = _PerFedAvgEntry(
    name="perfedavg",
    description="Per-FedAvg (first order): a global model trained to adapt to each silo in one step of alpha",
    defaults={"alpha": 0.01, "weighted": True, "server_learning_rate": 1.0},
    client="fedmeki_core.training.perfedavg:PerFedAvgClient",
    server=FedAvgServer,
)
