"""Server-side optimisers on the round's mean delta (the pseudo-gradient): FedAvgM, FedAdam, FedYogi, FedAdagrad.

FedAvgM (Hsu et al. 2019): m = beta m + delta; x += lr m.
FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, Algorithm 2, without bias correction as in the paper):
m = beta1 m + (1 - beta1) delta; v from delta^2 by Adam's, Yogi's or Adagrad's rule, starting at tau^2;
x += lr m / (sqrt(v) + tau). The silos run FedAvg's client half; m and v are per-tensor server state, saved
with every checkpoint, so a restarted coordinator continues the same optimisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmeki_core.algorithms.base import AlgorithmEntry, ServerState
from fedmeki_core.algorithms.fedavg import WeightedServer, validate_fedavg_options
from fedmeki_core.errors import InvalidInputError

Array = np.ndarray[Any, Any]


class FedAvgMServer(WeightedServer):
    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self._beta = float(options["momentum"])

    def apply(self, name: str, current: Array, mean_delta: Array, state: ServerState) -> Array:
        momentum = state.setdefault("momentum", np.zeros_like(mean_delta, dtype=np.float32))
        momentum *= self._beta
        momentum += mean_delta
        return current.astype(np.float64) + self._server_lr * momentum.astype(np.float64)  # no float32 overflow


def _adam_v(v: Array, squared: Array, beta2: float) -> None:
    v *= beta2
    v += (1 - beta2) * squared


def _yogi_v(v: Array, squared: Array, beta2: float) -> None:
    v -= (1 - beta2) * squared * np.sign(v - squared)


def _adagrad_v(v: Array, squared: Array, beta2: float) -> None:
    v += squared


class AdaptiveServer(WeightedServer):
    def __init__(self, options: Mapping[str, Any], second_moment: Callable[[Array, Array, float], None]) -> None:
        super().__init__(options)
        self._beta1, self._beta2, self._tau = float(options["beta1"]), float(options["beta2"]), float(options["tau"])
        self._second_moment = second_moment

    def apply(self, name: str, current: Array, mean_delta: Array, state: ServerState) -> Array:
        m = state.setdefault("m", np.zeros_like(mean_delta, dtype=np.float32))
        v = state.setdefault("v", np.full_like(mean_delta, self._tau**2, dtype=np.float32))
        m *= self._beta1
        m += (1 - self._beta1) * mean_delta
        with np.errstate(over="ignore"):  # a square over float32's range saturates v, which only slows the step
            self._second_moment(v, np.square(mean_delta).astype(np.float32), self._beta2)
        step = m.astype(np.float64) / (np.sqrt(v, dtype=np.float64) + self._tau)
        return current.astype(np.float64) + self._server_lr * step  # float64: the coordinator casts and checks it


class _ServerOptimizerEntry(AlgorithmEntry):
    def validate_options(self, options: Mapping[str, Any]) -> None:
        super().validate_options(options)
        validate_fedavg_options(self.name, options)
        for key in ("momentum", "beta1", "beta2"):
            if key in options and not 0 <= float(options[key]) < 1:
                raise InvalidInputError(f"{self.name} option {key!r} must lie in [0, 1)")
        if "tau" in options and float(options["tau"]) <= 0:
            raise InvalidInputError(f"{self.name} option 'tau' must be positive")


_CLIENT = {"weighted": True, "optimizer": "adam"}
_ADAPTIVE = {**_CLIENT, "server_learning_rate": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


def _adaptive(name: str, rule: Callable[[Array, Array, float], None], what: str) -> AlgorithmEntry:
    return _ServerOptimizerEntry(
        name=name,
        description=f"FedAvg's silos; the server applies {what} to the mean delta (Reddi et al. 2021)",
        defaults=_ADAPTIVE,
        client="fedmeki_core.training.fedavg:FedAvgClient",
        server=lambda options: AdaptiveServer(options, rule),
    )


FEDAVGM = _ServerOptimizerEntry(
    name="fedavgm",
    description="FedAvg's silos; the server moves with momentum on the mean delta (Hsu et al. 2019)",
    defaults={**_CLIENT, "server_learning_rate": 1.0, "momentum": 0.9},
    client="fedmeki_core.training.fedavg:FedAvgClient",
    server=FedAvgMServer,
)
FEDADAM = _adaptive("fedadam", _adam_v, "Adam")
FEDYOGI = _adaptive("fedyogi", _yogi_v, "Yogi")
FEDADAGRAD = _adaptive("fedadagrad", _adagrad_v, "Adagrad")
