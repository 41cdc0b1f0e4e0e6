"""A statistics job's result read as a table: per feature, globally and per silo where released; text, JSON, CSV.

Variances are population variances (divided by the count), as the normaliser uses them; quantiles are read from
the histogram, linearly within a bin, so they are as fine as its bins.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.jobspec_statistics import StatisticsSpec
from fedmeki_core.statistics import SILO_PREFIX

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class FeatureRow:
    """One feature's figures at one place ("global" or a silo's name); None where nothing was released."""

    scope: str
    feature: str
    count: float
    mean: float | None
    variance: float | None
    std: float | None
    minimum: float | None
    maximum: float | None
    quantiles: dict[str, float | None]
    histogram: list[float]
    edges: list[float]
    silos_released: int | None = None  # global rows: how many silos released the feature
    suppressed_bins: int | None = None  # global rows: bins the silos held back (under the minimum cell count)


def rows(spec: StatisticsSpec, tensors: Mapping[str, Array], extremes: bool = True) -> list[FeatureRow]:
    """Every feature's global row, then each silo's rows where the job released them (silos in name order);
    min/max where `extremes` (not for a CKKS sum) and the job adds no DP noise."""
    missing = [name for name in ("count", "total", "squares", "histogram", "edges") if name not in tensors]
    if missing:
        raise InvalidInputError(f"not a statistics job's result: no tensor {missing[0]!r}")
    table = _scope_rows(spec, "global", tensors, tensors, extremes)
    for index, row in enumerate(table):
        table[index] = _with(row, int(tensors["released"][index]), int(tensors["suppressed_bins"][index]))
    silos = sorted({key[len(SILO_PREFIX) :].rsplit("/", 1)[0] for key in tensors if key.startswith(SILO_PREFIX)})
    for silo in silos:
        own = {
            key.rsplit("/", 1)[1]: value for key, value in tensors.items() if key.startswith(f"{SILO_PREFIX}{silo}/")
        }
        table += _scope_rows(spec, silo, own, tensors, extremes)
    return table


def _with(row: FeatureRow, released: int, suppressed: int) -> FeatureRow:
    return FeatureRow(**{**asdict(row), "silos_released": released, "suppressed_bins": suppressed})


def _scope_rows(
    spec: StatisticsSpec, scope: str, own: Mapping[str, Array], result: Mapping[str, Array], extremes: bool
) -> list[FeatureRow]:
    table = []
    for index, name in enumerate(spec.features):
        bins = spec.bin_count(name)
        count = float(own["count"][index])
        edges = [float(e) for e in result["edges"][index, : bins + 1]]
        histogram = [float(h) for h in own["histogram"][index, :bins]]
        released = count >= 1  # under DP a noisy count may fall below 1: nothing to divide by
        mean = float(own["total"][index]) / count if released else None
        global_mean = float(result["total"][index]) / max(float(result["count"][index]), 1.0)
        variance = None
        if mean is not None:  # squares are about the global mean: shift them to this scope's own mean
            variance = max(float(own["squares"][index]) / count - (mean - global_mean) ** 2, 0.0)
        shown = extremes and spec.dp is None and released
        table.append(
            FeatureRow(
                scope=scope,
                feature=name,
                count=count,
                mean=mean,
                variance=variance,
                std=None if variance is None else math.sqrt(variance),
                minimum=float(own["minimum"][index]) if shown else None,
                maximum=float(own["maximum"][index]) if shown else None,
                quantiles={f"q{q:g}": _quantile(histogram, edges, q) for q in spec.quantiles},
                histogram=histogram,
                edges=edges,
            )
        )
    return table


def _quantile(histogram: list[float], edges: list[float], q: float) -> float | None:
    counts = np.maximum(np.array(histogram), 0.0)
    total = counts.sum()
    if total <= 0:
        return None
    cumulative = np.cumsum(counts)
    target = q * total
    index = int(np.searchsorted(cumulative, target))
    before = cumulative[index - 1] if index else 0.0
    share = (target - before) / counts[index] if counts[index] > 0 else 0.0
    return float(edges[index] + share * (edges[index + 1] - edges[index]))


def normaliser(spec: StatisticsSpec, tensors: Mapping[str, Array]) -> tuple[list[float], list[float]]:
    """(means, standard deviations) of every feature, globally; a feature nobody released cannot standardise."""
    mean, std = [], []
    for row in rows(spec, tensors)[: len(spec.features)]:
        if row.mean is None or row.std is None:
            raise InvalidInputError(f"feature {row.feature!r} was released by no silo: it has no mean to standardise")
        mean.append(row.mean)
        std.append(row.std or 1.0)  # a constant feature: centred, not scaled
    return mean, std


def as_json(table: list[FeatureRow]) -> str:
    return json.dumps([asdict(row) for row in table], indent=2)


_COLUMNS = ("scope", "feature", "count", "mean", "variance", "std", "minimum", "maximum")


def as_csv(table: list[FeatureRow]) -> str:
    """One line per feature and scope; quantiles as columns, the histogram as `counts|...` and `edges|...`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    quantiles = list(table[0].quantiles) if table else []
    writer.writerow([*_COLUMNS, "silos_released", "suppressed_bins", *quantiles, "histogram", "edges"])
    for row in table:
        values = [getattr(row, name) for name in _COLUMNS]
        writer.writerow(
            [
                *("" if v is None else v for v in values),
                "" if row.silos_released is None else row.silos_released,
                "" if row.suppressed_bins is None else row.suppressed_bins,
                *("" if row.quantiles[q] is None else row.quantiles[q] for q in quantiles),
                "|".join(f"{h:g}" for h in row.histogram),
                "|".join(f"{e:g}" for e in row.edges),
            ]
        )
    return out.getvalue()


def as_text(table: list[FeatureRow]) -> str:
    """The table for a terminal: one line per feature and scope."""
    quantiles = list(table[0].quantiles) if table else []
    header = ["scope", "feature", "count", "mean", "std", "min", "max", *quantiles, "silos"]
    lines = [header]
    for row in table:
        silos = "" if row.silos_released is None else f"{row.silos_released} ({row.suppressed_bins} bins cut)"
        lines.append(
            [
                row.scope,
                row.feature,
                f"{row.count:.0f}",
                *(_number(v) for v in (row.mean, row.std, row.minimum, row.maximum)),
                *(_number(row.quantiles[q]) for q in quantiles),
                silos,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"
