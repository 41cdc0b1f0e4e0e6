"""Federated statistics of a table's features: what each silo releases and how the coordinator adds it up.

A statistics job (JobSpec.statistics) runs two rounds over the same checkpoint layout (`layout`, float64):

1. Each silo releases, per feature, its row count, sum, min and max (`released` 1: it released the feature).
   The coordinator sums counts and sums, takes the min of the minima and the max of the maxima, and fixes every
   feature's histogram edges: declared ones, else the DP clipping bounds, else `bins` equal bins over [min, max].
2. Each silo releases the sum of squares about the global mean (two passes: no cancellation) and its histogram on
   those edges; the coordinator sums them. The result is the second round's checkpoint (`summary` reads it).

A silo with fewer rows than the minimum cell count (the job's `min_count`, at least the silo's own floor) releases
nothing for a feature (zeros, `released` 0), and a histogram bin below it is released as 0 (`suppressed_bins`
counts them). Under DP (statistics.dp) values are clipped to their bounds, min/max are not released, and Gaussian
or Laplace noise calibrated to one row's effect on everything a round releases is added (docs/researcher-guide.md,
"Federated statistics").

numpy only: the coordinator imports this module and must not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.jobspec_statistics import StatisticsDp, StatisticsSpec
from fedmeki_core.wire import TensorSpec

Array = np.ndarray[Any, Any]
FIRST = ("count", "total", "minimum", "maximum", "released")  # what round 1 sets
SECOND = ("squares", "histogram", "suppressed_bins")  # what round 2 sets
PER_SILO = ("count", "total", "minimum", "maximum", "squares", "histogram")  # a silo's own figures (per_silo)
SILO_PREFIX = "silo/"  # silo/<name>/<tensor>: a silo's figures in the result, where the job releases them


def layout(spec: StatisticsSpec) -> list[TensorSpec]:
    """The tensors of every checkpoint and update of a statistics job, in name order."""
    features, width = len(spec.features), spec.width
    shapes: dict[str, tuple[int, ...]] = {name: (features,) for name in (*FIRST, "squares", "suppressed_bins")}
    shapes |= {"histogram": (features, width), "edges": (features, width + 1)}
    return [TensorSpec(name, "F64", shape) for name, shape in sorted(shapes.items())]


def initial(spec: StatisticsSpec) -> dict[str, Array]:
    """Checkpoint 0: zeros."""
    return {t.name: np.zeros(t.shape, dtype=np.float64) for t in layout(spec)}


@dataclass(frozen=True)
class Release:
    """What a silo uploads for a round, and why it held back what it did (for its log and its report)."""

    tensors: dict[str, Array]
    suppressed: list[str] = field(default_factory=list)
    epsilon: float = 0.0  # the DP spend of this round


def release(
    spec: StatisticsSpec,
    round_number: int,
    data: Array,
    published: Mapping[str, Array],
    floor: int,
    rng: np.random.Generator,
    clip_to_edges: bool = False,
) -> Release:
    """A silo's update for `round_number` from its rows `data` [N, F] and the last checkpoint `published`;
    `clip_to_edges` (a CKKS job): values clipped to the declared edges, min/max not released."""
    if data.ndim != 2 or data.shape[1] != len(spec.features):
        raise InvalidInputError(
            f"this silo's table has {data.shape[1] if data.ndim == 2 else 0} encoded columns; the statistics job "
            f"declares {len(spec.features)} features"
        )
    tensors = initial(spec)
    min_count = max(spec.min_count, floor)
    rows = data.shape[0]
    if rows < min_count:  # every encoded column has a value in every row: the count is the table's
        reason = f"{rows} rows, under the minimum cell count {min_count}"
        return Release(tensors, [f"{name}: {reason}" for name in spec.features])
    values = data.astype(np.float64)
    dp = spec.dp
    if dp is not None:
        low, high = _bounds(spec)
        values = np.clip(values, low, high)
    if clip_to_edges:
        values = np.clip(values, *_edge_bounds(spec))
    if round_number == 1:
        tensors["count"][:] = rows
        tensors["total"][:] = values.sum(axis=0)
        tensors["released"][:] = 1.0
        if dp is None:
            if not clip_to_edges:  # a CKKS sum cannot take extremes
                tensors["minimum"][:], tensors["maximum"][:] = values.min(axis=0), values.max(axis=0)
            return Release(tensors)
        reach = np.maximum(np.abs(low), np.abs(high))  # one row moves a sum by at most this
        epsilon = _noise(spec, rng, [tensors["count"], tensors["total"]], [np.ones_like(reach), reach])
        return Release(tensors, epsilon=epsilon)
    mean = published["total"] / np.maximum(published["count"], 1.0)
    if dp is not None:  # a noisy mean may fall outside the bounds, beyond the reach the noise is calibrated to
        mean = np.clip(mean, *_bounds(spec))
    if clip_to_edges:  # a CKKS sum's noise may move the mean past an edge, beyond the squares' scale
        mean = np.clip(mean, *_edge_bounds(spec))
    tensors["squares"][:] = ((values - mean) ** 2).sum(axis=0)
    histogram = tensors["histogram"]
    for index, name in enumerate(spec.features):
        edges = published["edges"][index, : spec.bin_count(name) + 1]
        histogram[index, : len(edges) - 1] = _histogram(values[:, index], edges)
    epsilon = 0.0
    if dp is not None:
        low, high = _bounds(spec)
        reach = np.maximum(np.abs(low - mean), np.abs(high - mean)) ** 2
        epsilon = _noise(spec, rng, [tensors["squares"], histogram], [reach, np.ones_like(reach)])
        histogram[:] = np.maximum(histogram, 0.0)
    suppressed = []
    for index, name in enumerate(spec.features):
        small = histogram[index] < min_count  # a noisy count is cut after the noise: post-processing
        cut = int(np.count_nonzero(small & (histogram[index] > 0)))
        histogram[index, small] = 0.0
        tensors["suppressed_bins"][index] = cut
        if cut:
            suppressed.append(f"{name}: {cut} histogram bins under the minimum cell count {min_count}")
    return Release(tensors, suppressed, epsilon)


def _bounds(spec: StatisticsSpec) -> tuple[Array, Array]:
    assert spec.dp is not None
    pairs = np.array([spec.dp.bounds[name] for name in spec.features], dtype=np.float64)
    return pairs[:, 0], pairs[:, 1]


def _edge_bounds(spec: StatisticsSpec) -> tuple[Array, Array]:
    pairs = np.array([(spec.edges[name][0], spec.edges[name][-1]) for name in spec.features], dtype=np.float64)
    return pairs[:, 0], pairs[:, 1]


def _histogram(values: Array, edges: Array) -> Array:
    """Counts per bin; values outside the edges go to the first or last bin (numpy drops them)."""
    inside = np.clip(values, edges[0], edges[-1])
    counts, _ = np.histogram(inside, bins=edges)
    return counts.astype(np.float64)


def _noise(spec: StatisticsSpec, rng: np.random.Generator, parts: Sequence[Array], reach: Sequence[Array]) -> float:
    """Add the round's noise to `parts` in place; `reach[i]` bounds one row's effect on each feature of part i
    (a histogram row: 1 in one bin). The job's epsilon (and delta) is split evenly over its two rounds."""
    dp = spec.dp
    assert dp is not None
    epsilon = dp.epsilon / 2
    if dp.mechanism == "laplace":
        scale = float(sum(r.sum() for r in reach)) / epsilon  # L1 sensitivity / epsilon
        for part in parts:
            part += rng.laplace(0.0, scale, size=part.shape)
        return epsilon
    sigma = math.sqrt(float(sum((r**2).sum() for r in reach))) * noise_multiplier(dp)  # L2 sensitivity x z
    for part in parts:
        part += rng.normal(0.0, sigma, size=part.shape)
    return epsilon


def noise_multiplier(dp: StatisticsDp) -> float:
    """The Gaussian noise's standard deviation over the L2 sensitivity in each of the two rounds (the classic
    Gaussian mechanism at epsilon / 2, delta / 2): what a silo's privacy ledger charges per round."""
    return math.sqrt(2 * math.log(1.25 / (dp.delta / 2))) / (dp.epsilon / 2)


def combine(
    spec: StatisticsSpec, round_number: int, current: Mapping[str, Array], updates: Sequence[Mapping[str, Array]]
) -> dict[str, Array]:
    """The next checkpoint: round 1's sums, extremes and edges, or round 2's sums added to round 1's figures."""
    if not updates:
        raise InvalidInputError("a statistics round needs at least one silo's release")
    result = {name: np.array(value, dtype=np.float64) for name, value in current.items() if name in _NAMES}
    summed = FIRST if round_number == 1 else SECOND
    for name in summed:
        if name not in ("minimum", "maximum"):
            result[name] = np.sum([u[name] for u in updates], axis=0)
    if round_number == 1:
        released = np.array([u["released"] > 0 for u in updates])
        anyone = released.any(axis=0)
        minima = np.where(released, [u["minimum"] for u in updates], np.inf).min(axis=0)
        maxima = np.where(released, [u["maximum"] for u in updates], -np.inf).max(axis=0)
        result["minimum"] = np.where(anyone, minima, 0.0)
        result["maximum"] = np.where(anyone, maxima, 0.0)
        result["edges"] = _edges(spec, result["minimum"], result["maximum"])
    return result


_NAMES = frozenset((*FIRST, *SECOND, "edges"))


def _edges(spec: StatisticsSpec, minimum: Array, maximum: Array) -> Array:
    """Every feature's bin edges, padded to the widest with its last edge."""
    edges = np.zeros((len(spec.features), spec.width + 1))
    for index, name in enumerate(spec.features):
        if name in spec.edges:
            own = np.array(spec.edges[name])
        else:
            low, high = spec.dp.bounds[name] if spec.dp is not None else (minimum[index], maximum[index])
            if high <= low:  # one value (or nothing released): a unit-wide range around it
                low, high = low - 0.5, low + 0.5
            own = np.linspace(low, high, spec.bins + 1)
        edges[index, : len(own)] = own
        edges[index, len(own) :] = own[-1]
    return edges


def silo_tensors(name: str, round_number: int, update: Mapping[str, Array]) -> dict[str, Array]:
    """A silo's own figures of one round, named for the result (`silo/<name>/<tensor>`)."""
    keys = [key for key in PER_SILO if key in (FIRST if round_number == 1 else SECOND)]
    return {f"{SILO_PREFIX}{name}/{key}": np.array(update[key], dtype=np.float64) for key in keys}
