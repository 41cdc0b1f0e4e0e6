"""Per-job limits on what one silo's update can do to the global model; options every algorithm takes.

- `max_update_norm`: the most an update's L2 norm (over every tensor it carries, as uploaded) may be;
- `max_abs_value`: the most any one value of an update may be in magnitude;

both checked while the upload streams in: an update over either is refused with INVALID_ARGUMENT naming the option,
and nothing of it is stored. Off by default (a finite update cannot overflow the float64 sums anyway).

- `max_silo_weight`: the largest share, in (0, 1], of a round's total weight one update may have; larger shares
  are cut to it and the rest is shared out among the others in proportion to their weights (renormalised), so one
  silo declaring a huge sample count cannot outweigh all the others. Off by default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.option_types import shown

LIMIT_OPTIONS = ("max_update_norm", "max_abs_value", "max_silo_weight")


@dataclass(frozen=True)
class UpdateLimits:
    max_update_norm: float | None = None
    max_abs_value: float | None = None
    max_silo_weight: float | None = None

    @property
    def checks_values(self) -> bool:
        """Whether an upload's values must be checked against a bound (not possible on ciphertexts)."""
        return self.max_update_norm is not None or self.max_abs_value is not None


def update_limits(options: Mapping[str, Any]) -> UpdateLimits:
    """The limits an algorithm's options set; InvalidInputError names a bad one."""
    values: dict[str, float] = {}
    for key in LIMIT_OPTIONS:
        if key not in options:
            continue
        value = options[key]
        number = _as_float(value)
        if number is None or not math.isfinite(number) or number <= 0:
            raise InvalidInputError(f"option {key!r} must be a finite positive number, got {shown(value)}")
        values[key] = number
    if values.get("max_silo_weight", 1.0) > 1:
        raise InvalidInputError(f"option 'max_silo_weight' must lie in (0, 1], got {values['max_silo_weight']}")
    return UpdateLimits(**values)


def capped_shares(weights: Sequence[float], cap: float | None) -> list[float]:
    """Each weight's share of their total, none above `cap` (the excess shared out among the others in proportion
    to their weights); uniform shares when `cap` is below 1 / len(weights), as no share can then be under it."""
    total = sum(weights)
    if not weights or total <= 0:
        return [0.0 for _ in weights]
    shares = [weight / total for weight in weights]
    if cap is None:
        return shares
    if cap * len(weights) <= 1:
        return [1.0 / len(weights) for _ in weights]
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(weights)) if i not in capped]
        room = 1.0 - cap * len(capped)
        free_total = sum(weights[i] for i in free)
        for i in free:
            shares[i] = room * weights[i] / free_total if free_total > 0 else room / len(free)
        over = {i for i in free if shares[i] > cap}
        if not over:
            break
        capped |= over
        for i in over:
            shares[i] = cap
    return shares


def _as_float(value: object) -> float | None:
    """A number option as a float (an integer too large for one is infinite), or None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf
