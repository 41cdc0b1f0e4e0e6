"""Differential privacy for federated rounds: clip an update's L2 norm, add Gaussian noise, account for it.

The accountant is the Rényi-DP bound of the Gaussian mechanism (Mironov 2017): noise of std z times the
sensitivity costs alpha / (2 z^2) at order alpha per release; releases compose by adding; (epsilon, delta)-DP
follows as min over alpha of RDP(alpha) + log(1 / delta) / (alpha - 1). Every selected silo takes part in
every round here (no subsampling), so no amplification is claimed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

# Orders searched for the tightest epsilon (the usual grid of privacy accountants).
ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128.0, 256.0, 512.0])


def clip_factor(norm: float, clip_norm: float) -> float:
    """What to multiply an update of L2 norm `norm` by so that its norm is at most `clip_norm`."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of `releases` Gaussian mechanisms with noise std `noise_multiplier` x sensitivity, at `delta`."""
    return composed_epsilon([(noise_multiplier, releases)], delta)


def composed_epsilon(mechanisms: Iterable[tuple[float, int]], delta: float) -> float:
    """Epsilon at `delta` of Gaussian mechanisms composed, each given as (noise multiplier, releases): their RDP
    costs add at every order (mechanisms of several jobs on one dataset compose as one job's rounds do)."""
    released = [(z, n) for z, n in mechanisms if n > 0]
    if not released:
        return 0.0
    if any(z <= 0 for z, _ in released):
        return math.inf
    return min(sum(n * alpha / (2 * z**2) for z, n in released) + math.log(1 / delta) / (alpha - 1) for alpha in ORDERS)


def l2_norm(tensors: Iterable[tuple[Any, np.ndarray[Any, Any]]]) -> float:
    """The L2 norm of all `tensors` together ((spec, array) pairs, e.g. a file's, read once)."""
    total = 0.0
    for _, tensor in tensors:
        flat = tensor.reshape(-1)
        total += float(np.einsum("i,i->", flat, flat, dtype=np.float64))  # float32 squares would overflow
    return math.sqrt(total)
