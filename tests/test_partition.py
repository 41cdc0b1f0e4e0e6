"""Splitting a population into silos: every sample exactly once, and the skew Dirichlet's alpha asks for."""

from __future__ import annotations

import numpy as np
import pytest

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.partition import dirichlet_partition, iid_partition, public_split


def _covers(parts: list[np.ndarray], n: int) -> bool:
    joined = np.concatenate(parts)
    return len(joined) == n and set(joined.tolist()) == set(range(n))


def test_public_split_keeps_the_fraction_apart() -> None:
    public, private = public_split(1000, 0.1, seed=1)
    assert len(public) == 100 and _covers([public, private], 1000)
    assert np.array_equal(public, public_split(1000, 0.1, seed=1)[0])  # the same for the same seed


def test_iid_shares_are_near_equal_and_disjoint() -> None:
    parts = iid_partition(1001, 3, seed=0)
    assert sorted(map(len, parts)) == [333, 334, 334] and _covers(parts, 1001)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = np.random.default_rng(0).integers(0, 2, size=3000)

    def spread(alpha: float) -> float:  # mean distance of each silo's positive share from the population's
        parts = dirichlet_partition(labels, 5, alpha, seed=2)
        assert _covers(parts, len(labels))
        return float(np.mean([abs(labels[p].mean() - labels.mean()) for p in parts]))

    assert spread(0.1) > 3 * spread(100.0)
    assert spread(100.0) < 0.05


def test_impossible_splits_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="cannot split 2 samples into 3 silos"):
        iid_partition(2, 3, seed=0)
    with pytest.raises(InvalidInputError, match="alpha must be positive"):
        dirichlet_partition(np.zeros(10), 2, 0.0, seed=0)
    with pytest.raises(InvalidInputError, match="public fraction"):
        public_split(10, 1.0, seed=0)
