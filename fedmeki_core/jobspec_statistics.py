"""The statistics section of a job spec (a federated statistics job) and the normaliser a training job names.

A statistics job computes, over the declared feature columns of a tabular dataset, counts, means, variances,
min/max, histograms and quantiles (fedmeki_core/statistics.py); it runs STATISTICS_ROUNDS rounds and trains no
model. A training job's `normalise: {from_job: ID}` takes that job's means and standard deviations: the coordinator
checks the job at submission and fills them in, so every silo standardises the same way.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STATISTICS_ROUNDS = 2  # 1: counts, sums, min/max; 2: squares about the global mean, histograms on shared edges
MAX_FEATURES = 4096  # the encoded columns of a table (tabular.MAX_COLUMNS)
MAX_BINS = 1000


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StatisticsDp(_Spec):
    """Noise each silo adds to what it releases, calibrated to one row's effect (docs/researcher-guide.md)."""

    mechanism: Literal["gaussian", "laplace"] = "gaussian"
    epsilon: float = Field(gt=0, le=100)  # the job's whole spend, split evenly over its two rounds
    delta: float = Field(default=1e-5, gt=0, lt=1)  # gaussian only
    # Every feature's clipping bounds [low, high]: values are clipped to them, which bounds one row's effect; they
    # also stand in for min/max (never released under DP) and are the histogram's range where no edges are given.
    bounds: dict[str, tuple[float, float]]

    @field_validator("bounds")
    @classmethod
    def _ordered(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, (low, high) in value.items():
            if not low < high:
                raise ValueError(f"{name!r}: the low bound must be below the high one")
        return value


class StatisticsSpec(_Spec):
    # The names of the dataset's encoded columns, in order (a categorical column encodes as one column per level).
    features: tuple[str, ...] = Field(min_length=1, max_length=MAX_FEATURES)
    bins: int = Field(default=10, ge=1, le=MAX_BINS)  # equal bins between the global min and max
    edges: dict[str, tuple[float, ...]] = Field(default_factory=dict)  # fixed bin edges of some features
    quantiles: tuple[float, ...] = Field(default=(0.25, 0.5, 0.75), max_length=99)
    min_count: int = Field(default=10, ge=1)  # below it a silo releases nothing for a feature or a bin
    per_silo: bool = False  # release each silo's figures as well as the global ones
    dp: StatisticsDp | None = None

    @field_validator("features")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("a feature is named twice")
        if any(not 1 <= len(name) <= 200 or not name.isprintable() for name in value):
            raise ValueError("each feature name must be 1 to 200 printable characters")
        return value

    @field_validator("quantiles")
    @classmethod
    def _probabilities(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < q < 1 for q in value):
            raise ValueError("each quantile must lie in (0, 1)")
        return value

    @model_validator(mode="after")
    def _named_features(self) -> StatisticsSpec:
        names = set(self.features)
        for name, edges in self.edges.items():
            if name not in names:
                raise ValueError(f"edges: {name!r} is not a declared feature")
            if not 2 <= len(edges) <= MAX_BINS + 1 or any(b <= a for a, b in itertools.pairwise(edges)):
                raise ValueError(f"edges: {name!r} needs 2 to {MAX_BINS + 1} increasing edges")
            if not all(math.isfinite(e) for e in edges):
                raise ValueError(f"edges: {name!r} must be finite")
        if self.dp is not None:
            missing = [name for name in self.features if name not in self.dp.bounds]
            unknown = sorted(self.dp.bounds.keys() - names)
            if missing:
                raise ValueError(f"dp.bounds: {missing[0]!r} has no clipping bounds (every feature needs them)")
            if unknown:
                raise ValueError(f"dp.bounds: {unknown[0]!r} is not a declared feature")
        return self

    def bin_count(self, feature: str) -> int:
        return len(self.edges[feature]) - 1 if feature in self.edges else self.bins

    @property
    def width(self) -> int:
        """The histogram tensor's bins per feature: the most any feature has (the rest are padded with zeros)."""
        return max(self.bin_count(name) for name in self.features)


class NormaliseSpec(_Spec):
    """Standardise every feature as (x - mean) / std with a completed statistics job's global figures."""

    from_job: str = Field(pattern=r"^[0-9a-f]{32}$")
    # Filled in by the coordinator at submission from the statistics job's result; a spec must not give them.
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @model_validator(mode="after")
    def _same_length(self) -> NormaliseSpec:
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("mean and std must have one value per feature, std positive")
        return self


def statistics_job_error(rounds: int, given: set[str], modality: str, normalise: bool) -> tuple[str, str] | None:
    """(field, message) of what a statistics job may not be, or None: it reads a table, runs its two rounds,
    and takes no model, algorithm, privacy or injection settings (its noise is statistics.dp)."""
    if modality != "table":
        return "task", f"a statistics job reads a table (a tabular task), not {modality}"
    if rounds != STATISTICS_ROUNDS:
        return "rounds", f"a statistics job runs {STATISTICS_ROUNDS} rounds (leave rounds out), not {rounds}"
    if given:
        return sorted(given)[0], "a statistics job trains no model: leave it out (DP noise goes in statistics.dp)"
    if normalise:
        return "normalise", "a statistics job reads the table as it is"
    return None


def ckks_statistics_error(spec: StatisticsSpec) -> tuple[str, str] | None:
    """(field, message) of what a statistics job summed under CKKS may not be, or None: the coordinator only adds
    ciphertexts, so every histogram's edges are fixed up front, nothing is released per silo, and no DP noise."""
    why = "with privacy.secure_aggregation ckks"
    missing = [name for name in spec.features if name not in spec.edges]
    if missing:
        return (
            "statistics.edges",
            f"{why} every feature needs declared edges (min/max cannot be summed): {missing[0]!r} has none",
        )
    if spec.per_silo:
        return "statistics.per_silo", f"{why} only the global sums are released: per_silo must be false"
    if spec.dp is not None:
        return "statistics.dp", f"{why} DP noise is not supported yet: leave statistics.dp out"
    return None
