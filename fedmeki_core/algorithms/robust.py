"""Robust aggregation: how the server combines a round's deltas when some silos may be compromised.

Any algorithm takes the option `robust` (`algorithm.options.robust` in a job spec), a mapping whose `method` is

- `none` (the default): the (sample-)weighted mean, folded as updates arrive;
- `clip`: each update scaled to L2 norm at most `clip_norm` (over all its tensors) before the weighted mean;
  still folded as updates arrive (a first pass over the file for the norm);
- `median`: the coordinate-wise median of the updates;
- `trimmed_mean`: per coordinate, the mean after dropping the `trim_fraction` largest and smallest values;
- `krum` (Blanchard et al. 2017): the one update whose `n - byzantine - 2` nearest others are nearest in
  summed squared L2 distance; its guarantee needs n >= 2 byzantine + 3 updates.

The last three need every update of the round at once: the coordinator reads them back from their spooled files
when the round closes. They ignore sample counts (a compromised silo can claim any), as is usual for them. The
result takes the place of the mean delta, so the algorithm's server step (server learning rate, FedAdam, ...)
applies to it unchanged. The functions here are the numpy math on stacked values; `coordinator/robust_round.py`
feeds them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.option_types import has_type_of, shown

ROBUST_OPTION = "robust"
METHODS = ("none", "clip", "median", "trimmed_mean", "krum")
WHOLE_ROUND_METHODS = frozenset({"median", "trimmed_mean", "krum"})

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class RobustAggregation:
    method: str = "none"
    clip_norm: float = 1.0  # clip
    trim_fraction: float = 0.2  # trimmed_mean: dropped from each end, below 0.5
    byzantine: int = 1  # krum: the compromised silos it tolerates

    @property
    def whole_round(self) -> bool:
        """Whether the method needs all the round's updates at once (else updates fold as they arrive)."""
        return self.method in WHOLE_ROUND_METHODS


def robust_aggregation(options: Mapping[str, Any]) -> RobustAggregation:
    """The robust aggregation an algorithm's options ask for; InvalidInputError names a bad field."""
    value = options.get(ROBUST_OPTION, {})
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"option 'robust' must be a mapping with a method (one of {', '.join(METHODS)})")
    defaults = RobustAggregation()
    known = {f.name for f in fields(RobustAggregation)}
    for key, item in value.items():
        if key not in known:
            raise InvalidInputError(f"robust has no field {shown(key)} (fields: {', '.join(sorted(known))})")
        if not has_type_of(item, getattr(defaults, key)):
            raise InvalidInputError(f"robust.{key} must be {type(getattr(defaults, key)).__name__}, got {shown(item)}")
    robust = RobustAggregation(**value)
    if robust.method not in METHODS:
        raise InvalidInputError(f"robust.method must be one of {', '.join(METHODS)}, got {shown(robust.method)}")
    if not 0 < robust.clip_norm < math.inf:
        raise InvalidInputError("robust.clip_norm must be positive and finite")
    if not 0 <= robust.trim_fraction < 0.5:
        raise InvalidInputError("robust.trim_fraction must lie in [0, 0.5)")
    if robust.byzantine < 0:
        raise InvalidInputError("robust.byzantine must not be negative")
    return robust


def coordinate_median(stacked: Array) -> Array:
    """Per coordinate, the median of the rows (the mean of the middle two for an even count)."""
    median: Array = np.asarray(np.median(stacked, axis=0), dtype=stacked.dtype)
    return median


def trimmed_mean(stacked: Array, trim_fraction: float) -> Array:
    """Per coordinate, the mean of the rows left after dropping floor(trim_fraction * rows) from each end."""
    rows = stacked.shape[0]
    cut = int(trim_fraction * rows)
    kept = np.sort(stacked, axis=0)[cut : rows - cut]  # sorted: the sum is the same whatever the rows' order
    mean: Array = np.asarray(kept.mean(axis=0, dtype=np.float64), dtype=stacked.dtype)
    return mean


def add_squared_distances(stacked: Array, distances: Array) -> None:
    """Add the squared L2 distances between the rows of `stacked` (one block of each update) to `distances`."""
    rows = stacked.astype(np.float64, copy=False)
    for i in range(rows.shape[0] - 1):
        difference = rows[i + 1 :] - rows[i]
        squared = np.einsum("ij,ij->i", difference, difference)
        distances[i, i + 1 :] += squared
        distances[i + 1 :, i] += squared


def krum_choice(distances: Array, byzantine: int) -> int:
    """Krum's pick: the row whose `n - byzantine - 2` (at least 1) nearest other rows are nearest in sum."""
    count = distances.shape[0]
    if count == 1:
        return 0
    neighbours = max(1, count - byzantine - 2)
    others = np.sort(distances + np.diag(np.full(count, np.inf)), axis=1)[:, :neighbours]
    return int(np.argmin(others.sum(axis=1)))  # ties: the first, i.e. the lowest silo id
