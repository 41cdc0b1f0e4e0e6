"""Federated statistics without a coordinator: the spec's rules, the releases' arithmetic, the DP noise's scale,
quantiles from histograms, and the spec's trip over the wire."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedmeki_core.convert_spec import job_spec_from_proto, job_spec_to_proto
from fedmeki_core.errors import InvalidJobSpecError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.jobspec_statistics import StatisticsSpec
from fedmeki_core.statistics import combine, initial, release
from fedmeki_core.statistics_table import normaliser, rows

_JOB: dict[str, Any] = {"name": "s", "task": "tabular", "statistics": {"features": ["age", "lactate"]}}


def _two_rounds(spec: StatisticsSpec, silos: list[np.ndarray[Any, Any]], floor: int = 1) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    current = initial(spec)
    for number in (1, 2):
        current = combine(spec, number, current, [release(spec, number, d, current, floor, rng).tensors for d in silos])
    return current


def test_two_rounds_give_the_pooled_moments_extremes_and_histograms() -> None:
    rng = np.random.default_rng(1)
    silos = [rng.normal(loc=[60, 2], scale=[10, 0.5], size=(n, 2)) for n in (40, 25, 60)]
    spec = StatisticsSpec(features=("age", "lactate"), bins=5, edges={"lactate": (0.0, 1.0, 2.0, 3.0, 4.0)})
    result = _two_rounds(spec, silos)
    pooled = np.concatenate(silos)
    table = rows(spec, result)
    age, lactate = table
    assert (age.count, age.silos_released) == (125, 3)
    np.testing.assert_allclose([age.mean, age.variance], [pooled[:, 0].mean(), pooled[:, 0].var()], rtol=1e-12)
    assert (age.minimum, age.maximum) == (pooled[:, 0].min(), pooled[:, 0].max())
    assert age.edges[0] == age.minimum and age.edges[-1] == age.maximum and len(age.histogram) == 5
    assert lactate.edges == [0.0, 1.0, 2.0, 3.0, 4.0]  # declared edges; values beyond them count in the end bins
    cut = sum(1 for d in silos for c in np.histogram(np.clip(d[:, 1], 0, 4), bins=4, range=(0, 4))[0] if 0 < c < 10)
    assert lactate.suppressed_bins == cut and sum(lactate.histogram) <= 125
    mean, std = normaliser(spec, result)
    np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pooled.std(axis=0), rtol=1e-12)


def test_quantiles_are_read_from_the_histogram_within_a_bin() -> None:
    values = np.arange(1000, dtype=np.float64)[:, None]
    spec = StatisticsSpec(features=("x",), bins=100, quantiles=(0.1, 0.5, 0.9))
    (row,) = rows(spec, _two_rounds(spec, [values]))
    for name, expected in (("q0.1", 100), ("q0.5", 500), ("q0.9", 900)):
        assert abs(row.quantiles[name] - expected) <= 999 / 100  # one bin's width


def test_a_silo_under_the_cell_count_releases_nothing_and_its_floor_outranks_the_job() -> None:
    spec = StatisticsSpec(features=("x",), min_count=5)
    small = np.ones((4, 1))
    first = release(spec, 1, small, initial(spec), 1, np.random.default_rng())
    assert not any(value.any() for value in first.tensors.values())
    assert first.suppressed == ["x: 4 rows, under the minimum cell count 5"]
    floored = release(spec, 1, np.ones((8, 1)), initial(spec), 20, np.random.default_rng())
    assert floored.suppressed == ["x: 8 rows, under the minimum cell count 20"]


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_dp_noise_has_the_documented_scale_and_hides_the_extremes(mechanism: str) -> None:
    bounds = {"x": (0.0, 10.0), "y": (-2.0, 2.0)}
    dp = {"mechanism": mechanism, "epsilon": 1.0, "delta": 1e-5, "bounds": bounds}
    spec = StatisticsSpec(features=("x", "y"), dp=dp)  # type: ignore[arg-type]
    data = np.column_stack([np.full(100, 50.0), np.zeros(100)])  # x beyond its bound: clipped to 10
    rng = np.random.default_rng(3)
    totals = np.array([release(spec, 1, data, initial(spec), 1, rng).tensors["total"] for _ in range(4000)])
    # One row moves each count by 1 and each sum by at most max(|low|, |high|): 10 and 2.
    if mechanism == "laplace":
        expected = (1 + 10 + 1 + 2) / 0.5 * math.sqrt(2)  # b = L1 / (epsilon / 2); a Laplace's std is b * sqrt 2
    else:
        expected = math.sqrt(1 + 100 + 1 + 4) * math.sqrt(2 * math.log(1.25 / 5e-6)) / 0.5
    np.testing.assert_allclose(totals.std(axis=0), expected, rtol=0.05)
    np.testing.assert_allclose(totals.mean(axis=0), [1000.0, 0.0], atol=4 * expected / math.sqrt(4000))
    result = _two_rounds(spec, [data])
    row = rows(spec, result)[0]
    assert (row.minimum, row.maximum, row.edges[0], row.edges[-1]) == (None, None, 0.0, 10.0)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"rounds": 3}, "rounds", "runs 2 rounds"),
        ({"task": "xray-local-findings"}, "task", "reads a table"),
        ({"model": {"architecture": "tabular-logistic"}}, "model", "trains no model"),
        ({"privacy": {"secure_aggregation": "cyclic"}, "min_silos": 3}, "privacy", "trains no model"),
        ({"privacy": {"secure_aggregation": "ckks"}, "min_silos": 3}, "statistics.edges", "needs declared edges"),
        ({"statistics": {"features": ["a", "a"]}}, "statistics.features", "named twice"),
        ({"statistics": {"features": ["a"], "edges": {"a": [1.0, 0.0]}}}, "statistics", "increasing edges"),
        ({"statistics": {"features": ["a"], "edges": {"b": [0.0, 1.0]}}}, "statistics", "not a declared feature"),
        (
            {"statistics": {"features": ["a", "b"], "dp": {"epsilon": 1, "bounds": {"a": [0, 1]}}}},
            "statistics",
            "'b' has no clipping bounds",
        ),
        ({"statistics": {"features": ["a"], "quantiles": [1.0]}}, "statistics.quantiles", "must lie in (0, 1)"),
        ({"statistics": {"features": ["a"], "min_count": 0}}, "statistics.min_count", "greater than or equal to 1"),
    ],
)
def test_what_a_statistics_job_may_not_be(change: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidJobSpecError) as info:
        parse_job_spec({**_JOB, **change})
    assert info.value.field == field and message in info.value.message


def test_a_normaliser_is_for_tables_and_its_figures_come_from_the_coordinator() -> None:
    training = {"name": "t", "task": "tabular", "rounds": 1, "model": {"architecture": "tabular-logistic"}}
    with pytest.raises(InvalidJobSpecError, match="standardises a table's features"):
        parse_job_spec({**training, "task": "ecg-abnormal", "model": {}, "normalise": {"from_job": "a" * 32}})
    with pytest.raises(InvalidJobSpecError, match="from_job"):
        parse_job_spec({**training, "normalise": {"from_job": "../etc"}})
    spec = parse_job_spec({**training, "normalise": {"from_job": "a" * 32, "mean": [1.5], "std": [2.0]}})
    assert job_spec_from_proto(job_spec_to_proto(spec)) == spec


def test_a_statistics_spec_survives_the_wire() -> None:
    spec = parse_job_spec(
        {
            **_JOB,
            "statistics": {
                "features": ["age", "lactate"],
                "bins": 12,
                "edges": {"lactate": [0.0, 1.5, 3.0]},
                "per_silo": True,
                "dp": {"mechanism": "laplace", "epsilon": 2.0, "bounds": {"age": [0, 120], "lactate": [0, 20]}},
            },
        }
    )
    assert spec.rounds == 2 and job_spec_from_proto(job_spec_to_proto(spec), submission=True) == spec
