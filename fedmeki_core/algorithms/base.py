"""How the registry describes an FL algorithm: its options, its numpy server half, and where its client half lives.

The client halves (torch) live in `fedmeki_core.training`; an entry names its client half by import path, which only
the silo agent loads, so the coordinator that imports this registry never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol

import numpy as np

from fedmeki_core.algorithms.robust import ROBUST_OPTION, robust_aggregation
from fedmeki_core.algorithms.update_limits import LIMIT_OPTIONS, update_limits
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.option_types import has_type_of, shown

OPTIMIZERS = ("adam", "sgd")  # what the shared local loop can run


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
    # "module:attribute" of the client half's factory (fedmeki_core.training), loaded by the agent only
    client: str
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

    @property
    def option_names(self) -> frozenset[str]:
        """Every option the algorithm takes: its own and those every algorithm takes."""
        return frozenset({*self.defaults, ROBUST_OPTION, *LIMIT_OPTIONS})

    def validate_options(self, options: Mapping[str, Any]) -> None:
        robust_aggregation(options)  # every algorithm takes it: see fedmeki_core/algorithms/robust.py
        update_limits(options)  # and these: fedmeki_core/algorithms/update_limits.py
        for key, value in options.items():
            if key == ROBUST_OPTION or key in LIMIT_OPTIONS:
                continue
            if key not in self.defaults:
                known = ", ".join(sorted(self.option_names))
                raise InvalidInputError(f"{self.name} has no option {shown(key)} (options: {known})")
            if not has_type_of(value, self.defaults[key]):
                expected = type(self.defaults[key]).__name__
                raise InvalidInputError(f"{self.name} option {key!r} must be {expected}, got {shown(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidInputError(f"{self.name} option {key!r} must be finite, got {shown(value)}")
