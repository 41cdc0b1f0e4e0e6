"""FedProx (Li et al. 2020): FedAvg whose local objective adds (mu / 2) * ||w - w_global||^2.

In a suite, `proximal_scope: task` (the default) pulls back only the tensors the current task trains (its modality's
encoder and its head); `all` pulls every tensor, the other tasks' too. Measured in the approach grid, `all` with Adam
damages the model: a tensor the task does not train gets only the tiny proximal gradient, which Adam normalises into
full-size steps.

The proximal term keeps each silo's model near the round's global model, which bounds client drift on non-IID
data; the server half is FedAvg's. FedMEKI's code uses mu = 1e-6; the usual default elsewhere is 0.01.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmeki_core.algorithms.base import AlgorithmEntry
from fedmeki_core.algorithms.fedavg import FedAvgServer, validate_fedavg_options
from fedmeki_core.errors import InvalidInputError


class _FedProxEntry(AlgorithmEntry):
    def validate_options(self, options: Mapping[str, Any]) -> None:
        super().validate_options(options)
        validate_fedavg_options(self.name, options)
        if float(options.get("mu", 0.01)) < 0:
            raise InvalidInputError("fedprox option 'mu' must be non-negative")
        if options.get("proximal_scope", "all") not in ("all", "task"):
            raise InvalidInputError("fedprox option 'proximal_scope' must be 'all' or 'task'")


FEDPROX = _FedProxEntry(
    name="fedprox",
    description="FedAvg with a proximal term (mu / 2) ||w - w_global||^2 in each silo's local objective",
    defaults={"mu": 0.01, "proximal_scope": "task", "weighted": True, "server_learning_rate": 1.0, "optimizer": "adam"},
    client="fedmeki_core.training.fedprox:FedProxClient",
    server=FedAvgServer,
)
