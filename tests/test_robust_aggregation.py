"""Robust aggregation: the math against hand computations, the round's result from update files, the options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from coordinator.aggregation import RoundAccumulator
from fedmeki_core.algorithms import get_algorithm
from fedmeki_core.algorithms.base import ServerState
from fedmeki_core.algorithms.robust import (
    RobustAggregation,
    add_squared_distances,
    coordinate_median,
    krum_choice,
    robust_aggregation,
    trimmed_mean,
)
from fedmeki_core.errors import InvalidInputError, InvalidJobSpecError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.wire import UNTRAINED_KEY, TensorSpec, write_safetensors

F32 = np.float32


def test_median_and_trimmed_mean_by_hand() -> None:
    stacked = np.array([[1, 10, -3], [5, 20, -1], [2, 30, -2], [100, 0, 9], [3, 40, -4]], F32)
    np.testing.assert_array_equal(coordinate_median(stacked), [3, 20, -2])
    np.testing.assert_array_equal(coordinate_median(stacked[:4]), [3.5, 15, -1.5])  # even: the middle two's mean
    # trim 0.2 of 5 rows drops one at each end: (2 + 3 + 5) / 3, (10 + 20 + 30) / 3, (-3 - 2 - 1) / 3
    np.testing.assert_allclose(trimmed_mean(stacked, 0.2), [10 / 3, 20, -2], rtol=1e-6)
    np.testing.assert_allclose(trimmed_mean(stacked, 0.0), stacked.mean(axis=0), rtol=1e-6)


def test_krum_by_hand() -> None:
    # Points 0, 1, 3 and 20 on a line; byzantine 1 leaves n - f - 2 = 1 neighbour: scores 1, 1, 4, 289.
    points = np.array([[0.0], [1.0], [3.0], [20.0]], F32)
    distances = np.zeros((4, 4))
    add_squared_distances(points, distances)
    assert distances[0, 3] == 400 and distances[2, 1] == 4 and distances[3, 3] == 0
    assert krum_choice(distances, byzantine=1) == 0  # a tie of 1 and 1: the first
    # byzantine 0: two neighbours: 0 -> 1 + 9 = 10, 1 -> 1 + 4 = 5, 3 -> 4 + 9 = 13, 20 -> 289 + 361: picks 1.
    assert krum_choice(distances, byzantine=0) == 1
    distances_in_blocks = np.zeros((4, 4))  # distances add up over blocks (tensors) of the updates
    add_squared_distances(np.array([[0.0], [1.0], [3.0], [20.0]], F32), distances_in_blocks)
    add_squared_distances(np.array([[0.0], [0.0], [0.0], [0.0]], F32), distances_in_blocks)
    np.testing.assert_array_equal(distances_in_blocks, distances)


MANIFEST = [TensorSpec("a", "F32", (2, 2)), TensorSpec("b", "F32", (3,))]


def _update(path: Path, a: list[float], b: list[float], untrained: str = "") -> Path:
    metadata = {UNTRAINED_KEY: untrained} if untrained else None
    save_file({"a": np.array(a, F32).reshape(2, 2), "b": np.array(b, F32)}, str(path), metadata=metadata)
    return path


def _aggregate(
    tmp_path: Path, robust: dict[str, object], updates: dict[str, Path], arrival: list[str], weights: dict[str, float]
) -> dict[str, np.ndarray]:
    current = tmp_path / "current.safetensors"
    save_file({"a": np.zeros((2, 2), F32), "b": np.ones(3, F32)}, str(current))
    accumulator = RoundAccumulator(MANIFEST, sorted(updates), robust=robust_aggregation({"robust": robust}))
    for silo in arrival:
        accumulator.offer(silo, updates[silo], weights[silo])
    accumulator.close()
    entry = get_algorithm("fedavg")
    state: dict[str, ServerState] = {}
    order, steps = accumulator.next_global(current, entry.server(entry.resolve_options({})), state)
    return {spec.name: np.array(t, copy=True) for spec, (_, t) in zip(order, steps, strict=True)}


@pytest.fixture
def five_updates(tmp_path: Path) -> dict[str, Path]:
    values = {"s1": 1.0, "s2": 2.0, "s3": 3.0, "s4": 4.0, "s5": -50.0}  # s5 is far off
    return {s: _update(tmp_path / f"{s}.safetensors", [v, v, v, 2 * v], [v, 0, -v]) for s, v in values.items()}


WEIGHTS = {"s1": 1.0, "s2": 1.0, "s3": 1.0, "s4": 1.0, "s5": 96.0}  # sample counts: the whole-round methods ignore them


@pytest.mark.parametrize(
    ("robust", "a", "b"),
    [
        ({"method": "median"}, [2, 2, 2, 4], [1 + 2, 1, 1 - 2]),
        ({"method": "trimmed_mean", "trim_fraction": 0.2}, [2, 2, 2, 4], [1 + 2, 1, 1 - 2]),  # mean of 1, 2, 3
        ({"method": "trimmed_mean", "trim_fraction": 0.0}, [-8, -8, -8, -16], [1 - 8, 1, 1 + 8]),
        ({"method": "krum", "byzantine": 1}, [2, 2, 2, 4], [1 + 2, 1, 1 - 2]),  # s2: nearest to s1 and s3
        ({"method": "none"}, [-47.9, -47.9, -47.9, -95.8], [1 - 47.9, 1, 1 + 47.9]),  # weighted: s5 pulls hard
    ],
    ids=["median", "trimmed-mean", "untrimmed", "krum", "fedavg"],
)
def test_a_round_aggregates_robustly_whatever_the_arrival_order(
    tmp_path: Path, five_updates: dict[str, Path], robust: dict[str, object], a: list[float], b: list[float]
) -> None:
    first = _aggregate(tmp_path, robust, five_updates, ["s1", "s2", "s3", "s4", "s5"], WEIGHTS)
    second = _aggregate(tmp_path, robust, five_updates, ["s5", "s3", "s1", "s4", "s2"], WEIGHTS)
    for name in first:
        assert first[name].tobytes() == second[name].tobytes()  # bit for bit
    np.testing.assert_allclose(first["a"].reshape(-1), a, rtol=1e-5)
    np.testing.assert_allclose(first["b"], b, rtol=1e-5)


def test_clipping_bounds_each_update_before_the_weighted_mean(tmp_path: Path) -> None:
    updates = {
        "s1": _update(tmp_path / "s1.safetensors", [0.3, 0, 0, 0], [0.4, 0, 0]),  # norm 0.5: kept
        "s2": _update(tmp_path / "s2.safetensors", [30, 0, 0, 0], [40, 0, 0]),  # norm 50: scaled to 1
    }
    result = _aggregate(tmp_path, {"method": "clip", "clip_norm": 1.0}, updates, ["s1", "s2"], {"s1": 3, "s2": 1})
    np.testing.assert_allclose(result["a"].reshape(-1), [(3 * 0.3 + 0.6) / 4, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(result["b"], [1 + (3 * 0.4 + 0.8) / 4, 1, 1], rtol=1e-6)


def test_only_updates_that_trained_a_tensor_count_for_it(tmp_path: Path) -> None:
    updates = {
        "s1": _update(tmp_path / "s1.safetensors", [1, 1, 1, 1], [1, 1, 1]),
        "s2": _update(tmp_path / "s2.safetensors", [2, 2, 2, 2], [0, 0, 0], untrained="b"),
        "s3": _update(tmp_path / "s3.safetensors", [9, 9, 9, 9], [0, 0, 0], untrained="b"),
    }
    ones = {s: 1.0 for s in updates}
    median = _aggregate(tmp_path, {"method": "median"}, updates, list(updates), ones)
    np.testing.assert_array_equal(median["a"], np.full((2, 2), 2, F32))
    np.testing.assert_array_equal(median["b"], np.full(3, 2, F32))  # s1's alone
    nobody = {s: _update(tmp_path / f"n{s}.safetensors", [1, 1, 1, 1], [5, 5, 5], untrained="b") for s in updates}
    np.testing.assert_array_equal(_aggregate(tmp_path, {"method": "median"}, nobody, list(nobody), ones)["b"], 1)


def test_the_option_is_checked_and_taken_by_every_algorithm() -> None:
    assert robust_aggregation({}) == RobustAggregation()
    assert robust_aggregation({"robust": {"method": "krum", "byzantine": 2}}).whole_round
    for options, message in [
        ({"robust": "median"}, "must be a mapping"),
        ({"robust": {"method": "mode"}}, "robust.method must be one of"),
        ({"robust": {"method": "clip", "clip_norm": 0}}, "clip_norm must be positive"),
        ({"robust": {"method": "trimmed_mean", "trim_fraction": 0.5}}, r"trim_fraction must lie in \[0, 0.5\)"),
        ({"robust": {"method": "krum", "byzantine": 1.5}}, "robust.byzantine must be int"),
        ({"robust": {"method": "krum", "f": 1}}, "robust has no field 'f'"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            robust_aggregation(options)
    for name in ("fedavg", "fedprox", "fedadam", "scaffold", "ditto"):
        get_algorithm(name).validate_options({"robust": {"method": "median"}})
    spec = {"name": "j", "task": "synthetic-vitals", "rounds": 1, "algorithm": {"options": {"robust": {"method": "x"}}}}
    with pytest.raises(InvalidJobSpecError, match=r"algorithm\.options: robust\.method must be one of"):
        parse_job_spec(spec)
    central = {"dp": {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0}}
    spec = {**spec, "algorithm": {"options": {"robust": {"method": "median"}}}, "privacy": central}
    with pytest.raises(InvalidJobSpecError, match=r"algorithm\.options\.robust: cannot be combined with central"):
        parse_job_spec(spec)


def test_whole_round_methods_read_updates_in_a_narrow_encoding(tmp_path: Path) -> None:
    bf16 = [TensorSpec(spec.name, "BF16", spec.shape) for spec in MANIFEST]
    updates = {}
    for silo, bits in (("s1", 0x3F80), ("s2", 0x4000), ("s3", 0x4040)):  # 1.0, 2.0 and 3.0 in bfloat16
        updates[silo] = tmp_path / f"{silo}.safetensors"
        with updates[silo].open("wb") as f:
            write_safetensors(f, bf16, [np.full(spec.shape, bits, np.uint16) for spec in bf16])
    result = _aggregate(tmp_path, {"method": "median"}, updates, list(updates), {s: 1.0 for s in updates})
    np.testing.assert_array_equal(result["a"], np.full((2, 2), 2, F32))
    np.testing.assert_array_equal(result["b"], np.full(3, 3, F32))
