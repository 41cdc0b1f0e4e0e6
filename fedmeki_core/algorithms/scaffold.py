"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each silo's drift away from the global direction.

The server's control variate c travels in the checkpoint as one extra tensor per model tensor
("algorithm/scaffold.control/<name>", zero at first); each silo keeps its own c_i in its job state. Local steps
follow g + c - c_i (as the gradient of the extra loss term <c - c_i, w>), and afterwards, with K local steps of
learning rate lr (option II of the paper):

    c_i+ = c_i - c + (x - y_i) / (K lr)        upload: y_i - x, and c_i+ - c_i for the extra tensors

The server moves x by server_learning_rate times the mean model delta, and c by the mean control delta (the
paper's |S|/N factor is 1: every eligible silo takes part in a round here). Buffers (BatchNorm statistics) are not
trained by gradients: their control variates stay zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmeki_core.algorithms.base import EXTRA_PREFIX, ServerState
from fedmeki_core.algorithms.fedavg import FedAvgFamilyEntry, FedAvgServer

SLOT = "scaffold.control"
CONTROL_PREFIX = f"{EXTRA_PREFIX}{SLOT}/"


class ScaffoldServer(FedAvgServer):
    def apply(
        self, name: str, current: np.ndarray[Any, Any], mean_delta: np.ndarray[Any, Any], state: ServerState
    ) -> np.ndarray[Any, Any]:
        if name.startswith(CONTROL_PREFIX):  # c += mean(c_i+ - c_i), whatever the server learning rate
            mean_delta += current
            return mean_delta
        return super().apply(name, current, mean_delta, state)


SCAFFOLD = FedAvgFamilyEntry(
    name="scaffold",
    description="Control variates (server c in the checkpoint, silo c_i kept locally) correct client drift",
    # The paper's local steps are plain SGD; Adam would rescale the correction.
    defaults={"weighted": True, "server_learning_rate": 1.0, "optimizer": "sgd"},
    client="fedmeki_core.training.scaffold:ScaffoldClient",
    server=ScaffoldServer,
    extra_slots=(SLOT,),
)
