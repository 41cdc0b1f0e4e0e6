"""Numeric safety of aggregation: no accepted set of updates commits a non-finite checkpoint, every value a silo's
upload declares is checked at the door, and an update with a receipt is folded or its round fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from safetensors.numpy import load, save, save_file
from sqlalchemy import func, select

from coordinator.aggregation import _FOLD_CHUNK, RoundAccumulator
from coordinator.server import Coordinator
from coordinator.store.models import Update
from fedmeki_core.algorithms import get_algorithm
from fedmeki_core.algorithms.update_limits import capped_shares, update_limits
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.proto.v1 import common_pb2
from fedmeki_core.records import JobState
from fedmeki_core.wire import LOCAL_STEPS_KEY, TensorSpec, write_safetensors
from tests.conftest import address, enroll, wait_until
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes

F32 = np.float32


def _spec(**options: Any) -> common_pb2.JobSpec:
    struct = struct_pb2.Struct()
    struct.update(options)
    return job_spec(min_silos=2, algorithm=common_pb2.AlgorithmSpec(name="fedavg", options=struct))


def _round_one(coordinator: Coordinator, spec: common_pb2.JobSpec) -> tuple[str, RawSilo, RawSilo]:
    target = address(coordinator)
    a, b = (RawSilo(target, enroll(coordinator, name)) for name in ("a", "b"))
    for silo in (a, b):
        assert silo.poll() is None
    job = submit_raw(target, spec, weights_bytes(seed=1))
    assert a.poll(wait=5) is not None and b.poll(wait=5) is not None
    return job.id, a, b


def _updates(coordinator: Coordinator) -> int:
    with coordinator.database.read() as session:
        return int(session.scalar(select(func.count()).select_from(Update)) or 0)


def _failed(coordinator: Coordinator, job_id: str) -> str:
    """Wait for the job to fail; its reason."""
    wait_until(lambda: coordinator.scheduler.status(job_id).state.finished)
    status = coordinator.scheduler.status(job_id)
    assert status.state == JobState.FAILED and status.current_round == 0, status
    return status.reason


def _committed(coordinator: Coordinator, job_id: str) -> None:
    """Wait for round 1 to commit (the final evaluation round opens after it)."""
    wait_until(lambda: coordinator.scheduler.status(job_id).current_round == 1)


def test_updates_of_huge_finite_values_make_a_finite_checkpoint(coordinator: Coordinator) -> None:
    # 3.0e38 fits float32; two of them summed in float32 are +Inf. Accumulated in float64, the mean is 3.0e38.
    job_id, a, b = _round_one(coordinator, _spec())
    for silo in (a, b):
        silo.upload(job_id, 1, save(tensors(3.0e38)), num_samples=10)
    _committed(coordinator, job_id)
    checkpoint = load(coordinator.artifacts.checkpoint_path(job_id, 1).read_bytes())
    for name, value in load(weights_bytes(seed=1)).items():
        assert np.isfinite(checkpoint[name]).all()
        np.testing.assert_allclose(checkpoint[name], value + 3.0e38, rtol=1e-6)


def test_a_checkpoint_that_would_not_be_finite_fails_the_round_with_the_reason(coordinator: Coordinator) -> None:
    # A server learning rate of 2 doubles a mean of 3.0e38 past float32's range: the round cannot commit.
    job_id, a, b = _round_one(coordinator, _spec(server_learning_rate=2.0))
    for silo in (a, b):
        silo.upload(job_id, 1, save(tensors(3.0e38)), num_samples=10)
    reason = _failed(coordinator, job_id)
    assert "round 1:" in reason and "not finite" in reason, reason
    assert not coordinator.artifacts.checkpoint_path(job_id, 1).exists()


def _refused(silo: RawSilo, job_id: str, payload: bytes, text: str, **header: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        silo.upload(job_id, 1, payload, **header)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert text in str(info.value.details()), info.value.details()


def test_the_jobs_bounds_on_an_update_are_checked_at_upload(coordinator: Coordinator) -> None:
    job_id, a, b = _round_one(coordinator, _spec(max_abs_value=5.0, max_update_norm=10.0))
    big_value = tensors(0.5)
    big_value["b"][2] = -6.0
    _refused(a, job_id, save(big_value), "max_abs_value 5.0")
    _refused(a, job_id, save(tensors(4.0)), "max_update_norm 10.0")  # 17 values of 4: norm 16.5
    half = {name: value.astype(np.float16) for name, value in tensors(0.5).items()}
    _refused(a, job_id, save(half), "has dtype F16")
    assert _updates(coordinator) == 0
    a.upload(job_id, 1, save(tensors(1.0)))  # norm sqrt(17) < 10, every value 1 < 5
    b.upload(job_id, 1, save(tensors(-1.0)))
    _committed(coordinator, job_id)


def test_header_values_are_validated_at_upload_and_nothing_is_stored(coordinator: Coordinator) -> None:
    job_id, a, b = _round_one(coordinator, _spec())
    for steps in ("9" * 400, "²", "1" * 5000, "0", "-3", " 7", "١٢"):
        _refused(a, job_id, save(tensors(0.5), metadata={LOCAL_STEPS_KEY: steps}), LOCAL_STEPS_KEY)
    too_many = {f"m{i}": 0.5 for i in range(300)}
    for metrics, text in [
        ({"loss": float("nan")}, "'loss' must be finite"),
        ({"loss": float("inf")}, "'loss' must be finite"),
        ({"loss": 1e300}, "'loss' must be finite"),
        ({"x" * 200: 0.5}, "metrics: name"),
        ({"bad\x1b[2Jname": 0.5}, "metrics: name"),
        (too_many, "300 names"),
    ]:
        _refused(a, job_id, save(tensors(0.5)), text, metrics=common_pb2.Metrics(values=metrics))
    assert _updates(coordinator) == 0
    assert not list((coordinator.artifacts.root / "updates").rglob("*.safetensors"))
    a.upload(job_id, 1, save(tensors(0.5), metadata={LOCAL_STEPS_KEY: "1000000000"}))
    b.upload(job_id, 1, save(tensors(0.5)))
    _committed(coordinator, job_id)


def test_an_update_with_a_receipt_is_folded_or_its_round_fails(coordinator: Coordinator) -> None:
    # Silo a's accepted update is damaged on disk before it is folded (b, reporting last, closes the round):
    # the round must fail naming it, never commit "2/2" from b's update alone.
    job_id, a, b = _round_one(coordinator, _spec(max_silo_weight=0.9))  # folded at close: after the damage
    a.upload(job_id, 1, save(tensors(0.5)))
    with coordinator.database.read() as session:
        (path,) = session.scalars(select(Update.path)).all()
    damaged = coordinator.artifacts.absolute(path)
    damaged.write_bytes(damaged.read_bytes()[:-8])
    b.upload(job_id, 1, save(tensors(0.5)))
    reason = _failed(coordinator, job_id)
    assert "round 1:" in reason and "cannot be aggregated" in reason, reason


def test_max_silo_weight_caps_one_silos_share_and_renormalises(tmp_path: Path) -> None:
    np.testing.assert_allclose(capped_shares([1000, 1, 1], 0.5), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(capped_shares([1000, 100, 1], 0.5), [0.5, 0.5 * 100 / 101, 0.5 / 101])
    np.testing.assert_allclose(capped_shares([6, 3, 1], None), [0.6, 0.3, 0.1])
    np.testing.assert_allclose(capped_shares([5, 1], 0.3), [0.5, 0.5])  # no share can be under 1/2: uniform
    manifest = [TensorSpec("w", "F32", (2,))]
    current = tmp_path / "current.safetensors"
    save_file({"w": np.zeros(2, F32)}, str(current))
    accumulator = RoundAccumulator(manifest, ["a", "b", "c"], max_silo_weight=0.5)
    for silo, value, weight in [("a", 10.0, 1000.0), ("b", 1.0, 1.0), ("c", 3.0, 1.0)]:
        save_file({"w": np.full(2, value, F32)}, str(tmp_path / f"{silo}.safetensors"))
        accumulator.offer(silo, tmp_path / f"{silo}.safetensors", weight)
    accumulator.close()
    server = get_algorithm("fedavg").server(get_algorithm("fedavg").resolve_options({}))
    _, steps = accumulator.next_global(current, server, {})
    np.testing.assert_allclose(next(steps)[1], [0.5 * 10 + 0.25 * 1 + 0.25 * 3] * 2, rtol=1e-6)


def test_a_tensor_longer_than_a_fold_chunk_is_the_exact_float64_weighted_mean(tmp_path: Path) -> None:
    size = _FOLD_CHUNK + 1001  # a whole chunk and a partial one
    manifest = [TensorSpec("w", "F32", (size,)), TensorSpec("b", "F32", (3,))]
    current = tmp_path / "current.safetensors"
    save_file({"w": np.zeros(size, F32), "b": np.zeros(3, F32)}, str(current))
    rng = np.random.default_rng(7)
    updates = [(f"s{i}", rng.standard_normal(size).astype(F32), weight) for i, weight in enumerate([3.0, 0.7, 11.0])]
    accumulator = RoundAccumulator(manifest, [silo for silo, _, _ in updates])
    for silo, delta, weight in updates:
        save_file({"w": delta, "b": np.ones(3, F32)}, str(tmp_path / f"{silo}.safetensors"))
        accumulator.offer(silo, tmp_path / f"{silo}.safetensors", weight)
    accumulator.close()
    total = np.zeros(size)
    for _, delta, weight in updates:  # the fold's order and precision: float64, silo by silo
        total += delta.astype(np.float64) * weight
    mean = total / sum(weight for _, _, weight in updates)
    server = get_algorithm("fedavg").server(get_algorithm("fedavg").resolve_options({}))
    order, steps = accumulator.next_global(current, server, {})
    new = {spec.name: np.array(value, copy=True) for spec, (_, value) in zip(order, steps, strict=True)}
    np.testing.assert_array_equal(new["w"], server.apply("w", np.zeros(size, F32), mean, {}).astype(F32))
    np.testing.assert_array_equal(new["b"], np.ones(3, F32))


def _new_global(tmp_path: Path, manifest: list[TensorSpec], updates: list[tuple[str, Path, float]]) -> list[bytes]:
    current = tmp_path / "current.safetensors"
    with current.open("wb") as f:
        write_safetensors(f, manifest, (np.zeros(spec.shape, F32) for spec in manifest))
    accumulator = RoundAccumulator(manifest, [silo for silo, _, _ in updates])
    for silo, path, weight in updates:
        accumulator.offer(silo, path, weight)
    accumulator.close()
    server = get_algorithm("fedavg").server(get_algorithm("fedavg").resolve_options({}))
    _, steps = accumulator.next_global(current, server, {})
    return [new.tobytes() for _, new in steps]


def test_a_model_of_many_tensors_folds_in_one_pass_to_the_same_bits_as_tensor_by_tensor(tmp_path: Path) -> None:
    # Updates stored in the manifest's order fold as one array; stored in another order, tensor by tensor. Any mix
    # of the two gives the same bits: the same float64 operations, element by element.
    manifest = [TensorSpec(f"t{i:03d}", "F32", (i % 7 + 1, 3)) for i in range(40)]
    manifest.append(TensorSpec("t999", "F32", (_FOLD_CHUNK + 5,)))  # longer than a fold chunk
    rng = np.random.default_rng(11)
    weights = [3.0, 0.7, 11.0]
    paths: dict[tuple[int, bool], Path] = {}
    for index in range(len(weights)):
        values = [rng.standard_normal(spec.shape).astype(F32) for spec in manifest]
        values[5][0, 0] = -0.0
        for in_order in (True, False):
            path = paths[index, in_order] = tmp_path / f"u{index}-{in_order}.safetensors"
            pairs = list(zip(manifest, values, strict=True))
            pairs = pairs if in_order else pairs[::-1]
            with path.open("wb") as f:
                write_safetensors(f, [spec for spec, _ in pairs], (value for _, value in pairs))
    results = {
        mix: _new_global(tmp_path, manifest, [(f"s{i}", paths[i, mix[i]], w) for i, w in enumerate(weights)])
        for mix in [(True, True, True), (False, False, False), (True, False, True), (False, True, True)]
    }
    assert len({tuple(result) for result in results.values()}) == 1


@pytest.mark.parametrize(
    "options",
    [{"max_silo_weight": 0}, {"max_silo_weight": 1.5}, {"max_abs_value": -1}, {"max_update_norm": float("inf")}],
)
def test_bad_update_limits_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError, match=next(iter(options))):
        update_limits(options)
