"""Splitting one population of samples into silos: IID, Dirichlet label skew, and the server's public split."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmeki_core.errors import InvalidInputError

IndexArray = np.ndarray[Any, np.dtype[np.int64]]


def public_split(num_samples: int, fraction: float, seed: int) -> tuple[IndexArray, IndexArray]:
    """(public, private) sample indices: FedMEKI keeps 10% of each dataset public, at the server."""
    if not 0 <= fraction < 1:
        raise InvalidInputError(f"public fraction must lie in [0, 1), got {fraction}")
    order = np.random.default_rng([seed, 1]).permutation(num_samples).astype(np.int64)
    cut = round(num_samples * fraction)
    return np.sort(order[:cut]), np.sort(order[cut:])


def iid_partition(num_samples: int, num_silos: int, seed: int) -> list[IndexArray]:
    """Shuffled, near-equal shares."""
    _check_silos(num_samples, num_silos)
    order = np.random.default_rng([seed, 2]).permutation(num_samples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(order, num_silos)]


def dirichlet_partition(labels: np.ndarray[Any, Any], num_silos: int, alpha: float, seed: int) -> list[IndexArray]:
    """Label skew: each class's samples are shared out by proportions drawn from Dirichlet(alpha).

    Small alpha gives silos dominated by one class; large alpha approaches IID. Draws repeat (same seed
    stream) until every silo has at least one sample.
    """
    if alpha <= 0:
        raise InvalidInputError(f"Dirichlet alpha must be positive, got {alpha}")
    _check_silos(len(labels), num_silos)
    rng = np.random.default_rng([seed, 3])
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_silos)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_silos))[:-1] * len(members)).astype(int)
            for silo, share in enumerate(np.split(members, cuts)):
                parts[silo].extend(share.tolist())
        if all(parts):
            return [np.sort(np.array(part, dtype=np.int64)) for part in parts]
    raise InvalidInputError(f"alpha {alpha} leaves a silo without samples; use more samples or a larger alpha")


def _check_silos(num_samples: int, num_silos: int) -> None:
    if num_silos < 1 or num_samples < num_silos:
        raise InvalidInputError(f"cannot split {num_samples} samples into {num_silos} silos")
