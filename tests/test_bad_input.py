"""Hostile and broken input: each gets a precise status and message, and changes nothing.

After every rejection the server keeps serving, the database holds no trace of it, and the round's
aggregate is exactly what the valid updates alone produce.
"""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from safetensors.numpy import load, save
from sqlalchemy import func, select

from coordinator.server import Coordinator
from coordinator.store.models import Job, Update
from fedmeki_core.proto.v1 import common_pb2, silo_pb2, silo_pb2_grpc
from tests.conftest import address, enroll, wait_until
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, update_messages, weights_bytes
from tests.upload_cases import ENCODED_CASES, INT8_FIELDS, TOPK_FIELDS, honest_int8, honest_topk


def _rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value


def _count(coordinator: Coordinator, model: type) -> int:
    with coordinator.database.read() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_invalid_job_specs_are_rejected_naming_the_field(coordinator: Coordinator) -> None:
    enroll(coordinator, "only-silo")
    cases = [
        (job_spec(task="no-such-task"), "task"),
        (job_spec(algorithm=common_pb2.AlgorithmSpec(name="fedmagic")), "algorithm.name"),
        (job_spec(rounds=0), "rounds"),
        (job_spec(min_silos=2), "min_silos"),
        (job_spec(silos=["nobody"]), "silos"),
    ]
    for spec, field in cases:
        error = _rpc_error(lambda spec=spec: submit_raw(address(coordinator), spec, weights_bytes()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.details())
        assert f"invalid job spec: {field}:" in error.details(), (field, error.details())
    bad_weights = [
        (b"not a safetensors file at all", grpc.StatusCode.INVALID_ARGUMENT, "not a safetensors stream"),
        (save({"w": np.array([np.nan], dtype=np.float32)}), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        (save({"w": np.array([1], dtype=np.int64)}), grpc.StatusCode.INVALID_ARGUMENT, "exchanged tensors must be"),
    ]
    for weights, code, text in bad_weights:
        error = _rpc_error(lambda weights=weights: submit_raw(address(coordinator), job_spec(), weights))
        assert error.code() == code and text in error.details(), error.details()
    assert _count(coordinator, Job) == 0
    assert not list((coordinator.artifacts.root / "checkpoints").glob("*/*"))


def test_credentials_are_checked_on_every_silo_call(coordinator: Coordinator) -> None:
    credential = enroll(coordinator, "hospital")
    target = address(coordinator)
    no_credential = RawSilo(target, "")
    unknown = RawSilo(target, "not-a-credential")
    assert _rpc_error(lambda: no_credential.poll()).code() == grpc.StatusCode.UNAUTHENTICATED
    error = _rpc_error(lambda: unknown.poll())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown silo credential" in error.details()
    error = _rpc_error(lambda: unknown.upload("job", 1, b"x"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    coordinator.registry.revoke("hospital")
    error = _rpc_error(lambda: RawSilo(target, credential).poll())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in error.details()
    _, token = coordinator.registry.add("second")
    enroll_again = grpc.insecure_channel(target)
    from fedmeki_core.proto.v1 import silo_pb2_grpc

    stub = silo_pb2_grpc.SiloServiceStub(enroll_again)
    stub.Enroll(silo_pb2.EnrollRequest(token=token))
    error = _rpc_error(lambda: stub.Enroll(silo_pb2.EnrollRequest(token=token)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "already used" in error.details()
    enroll_again.close()


def _delta(value: float = 0.25, **replace: np.ndarray) -> bytes:
    arrays = tensors(value)
    arrays.update(replace)
    return save(arrays)


def test_bad_uploads_are_rejected_and_never_reach_the_aggregate(coordinator: Coordinator) -> None:
    target = address(coordinator)
    silos = {name: RawSilo(target, enroll(coordinator, name)) for name in ("a", "b", "c")}
    outsider = RawSilo(target, enroll(coordinator, "outsider"))  # enrolled, but has not polled: not selected
    for silo in silos.values():
        assert silo.poll() is None
    initial = weights_bytes(seed=3)
    job = submit_raw(target, job_spec(min_silos=3, rounds=1), initial)
    task = silos["a"].poll(wait=5)
    assert task is not None and task.round == 1
    a = silos["a"]
    header_cap = coordinator.settings.max_header_bytes
    huge_header = struct.pack("<Q", header_cap + 1) + b"{}"
    good = _delta(0.25)
    cases: list[tuple[str, list[silo_pb2.UploadUpdateRequest], grpc.StatusCode, str]] = [
        ("not selected round", update_messages(job.id, 7, good), grpc.StatusCode.FAILED_PRECONDITION, "not selected"),
        ("unknown job", update_messages("nope", 1, good), grpc.StatusCode.FAILED_PRECONDITION, "not selected"),
        (
            "chunk before header",
            update_messages(job.id, 1, good)[1:],
            grpc.StatusCode.INVALID_ARGUMENT,
            "first UploadUpdate message must be the header",
        ),
        ("truncated", update_messages(job.id, 1, good)[:-2], grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        (
            "declared size over limit",
            update_messages(job.id, 1, good, total_size=coordinator.settings.max_update_bytes + 1),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "exceeds the limit",
        ),
        (
            "header over limit",
            update_messages(job.id, 1, huge_header, total_size=header_cap + 1000),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "header of",
        ),
        (
            "unknown tensor",
            update_messages(job.id, 1, _delta(extra=np.zeros(2, np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensor 'extra' is not in the round's manifest",
        ),
        (
            "missing tensor",
            update_messages(job.id, 1, save({"a": tensors(0.1)["a"]})),
            grpc.StatusCode.INVALID_ARGUMENT,
            "missing tensor 'b'",
        ),
        (
            "wrong shape",
            update_messages(job.id, 1, _delta(b=np.zeros(6, np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensor 'b' has shape [6], the manifest says [5]",
        ),
        (
            "wrong dtype",
            update_messages(job.id, 1, _delta(b=np.zeros(5, np.float64))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensor 'b' has dtype F64, the manifest says F32",
        ),
        (
            "NaN",
            update_messages(job.id, 1, _delta(b=np.array([0, 0, np.nan, 0, 0], np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensor 'b' contains NaN or Inf",
        ),
        (
            "Inf",
            update_messages(job.id, 1, _delta(a=np.full((4, 3), np.inf, np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensor 'a' contains NaN or Inf",
        ),
        (
            "sha256 mismatch",
            update_messages(job.id, 1, good, sha256="0" * 64),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sha256 mismatch",
        ),
        (
            "malformed sha256",
            update_messages(job.id, 1, good, sha256="xyz"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "64 lowercase hex",
        ),
        (
            "zero samples",
            update_messages(job.id, 1, good, num_samples=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "num_samples",
        ),
        (
            "2^63 - 1 samples",
            update_messages(job.id, 1, good, num_samples=2**63 - 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_update_samples",
        ),
        (
            "NaN metric",
            update_messages(job.id, 1, good, metrics=common_pb2.Metrics(values={"loss": float("nan")})),
            grpc.StatusCode.INVALID_ARGUMENT,
            "metrics: 'loss' must be finite",
        ),
        (
            "unknown encoding",
            update_messages(job.id, 1, good, encoding="pickle"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unsupported update encoding",
        ),
    ]
    gap = update_messages(job.id, 1, good)
    gap[2].chunk.offset += 1
    cases.append(("chunk offset gap", gap, grpc.StatusCode.INVALID_ARGUMENT, "expected"))
    for name, messages, code, text in cases:
        error = _rpc_error(lambda messages=messages: a.upload_messages(messages))
        assert error.code() == code, f"{name}: {error.code()} {error.details()}"
        assert text in error.details(), f"{name}: {error.details()!r} lacks {text!r}"
    error = _rpc_error(lambda: outsider.upload(job.id, 1, good))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _count(coordinator, Update) == 0
    assert not list((coordinator.artifacts.root / "incoming").rglob("*.tmp"))

    # The server still serves, and only valid updates count: a duplicate is refused, not double-counted.
    a.upload(job.id, 1, _delta(0.25), num_samples=10)
    error = _rpc_error(lambda: a.upload(job.id, 1, _delta(9.0), num_samples=10))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "already reported" in error.details()
    silos["b"].upload(job.id, 1, _delta(1.0), num_samples=30)
    silos["c"].upload(job.id, 1, _delta(-0.5), num_samples=20, chunk=7)
    wait_until(lambda: coordinator.scheduler.status(job.id).current_round == 1)
    expected_mean = (0.25 * 10 + 1.0 * 30 - 0.5 * 20) / 60
    checkpoint = load(coordinator.artifacts.checkpoint_path(job.id, 1).read_bytes())
    for name, value in load(initial).items():
        np.testing.assert_allclose(checkpoint[name], value + expected_mean, rtol=1e-6, atol=1e-6)
    error = _rpc_error(lambda: silos["c"].upload(job.id, 1, _delta(0.0)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


def test_an_update_must_travel_in_the_jobs_delta_encoding(sqlite_coordinator: Coordinator) -> None:
    target = address(sqlite_coordinator)
    silo = RawSilo(target, enroll(sqlite_coordinator, "a"))
    silo.poll()
    job = submit_raw(target, job_spec(delta_encoding="float16"), weights_bytes())
    assert silo.poll(wait=5) is not None
    error = _rpc_error(lambda: silo.upload(job.id, 1, _delta(0.5)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has dtype F32, the manifest says F16" in error.details()
    half = {name: value.astype(np.float16) for name, value in tensors(0.5).items()}
    silo.upload(job.id, 1, save(half))


def test_an_injector_report_for_a_job_id_that_is_not_one_is_invalid(coordinator: Coordinator) -> None:
    # The injector's ReportEvaluation looks the injection up by job id: one with a NUL byte must never reach
    # PostgreSQL (which refuses it), and a sample count beyond the bound is refused like an upload's.
    _, token = coordinator.registry.add("injector", role="injector")
    with grpc.insecure_channel(address(coordinator)) as channel:
        credential = silo_pb2_grpc.SiloServiceStub(channel).Enroll(silo_pb2.EnrollRequest(token=token)).credential
    injector = RawSilo(address(coordinator), credential)
    for job_id, samples, text in [("a\x00b", 10, "is not a job id"), ("0" * 32, 2**63 - 1, "max_update_samples")]:
        request = silo_pb2.ReportEvaluationRequest(job_id=job_id, round=0, num_samples=samples)
        error = _rpc_error(lambda request=request: injector.call("ReportEvaluation", request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert text in error.details()


@pytest.mark.parametrize("fields", [INT8_FIELDS, TOPK_FIELDS], ids=["int8", "topk"])
def test_malformed_encoded_updates_are_refused_and_store_nothing(coordinator: Coordinator, fields: dict) -> None:
    target = address(coordinator)
    silo = RawSilo(target, enroll(coordinator, "a"))
    silo.poll()
    initial = weights_bytes(seed=5)
    job = submit_raw(target, job_spec(**fields), initial)
    assert silo.poll(wait=5) is not None
    cases = [case for case in ENCODED_CASES if case[1] == fields]
    assert len(cases) >= 7
    for kind, _, arrays, text in cases:
        for chunk in (3, 64, 1 << 20):  # the checks hold wherever the chunks cut the values
            error = _rpc_error(lambda arrays=arrays, chunk=chunk: silo.upload(job.id, 1, save(arrays), chunk=chunk))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (kind, error.details())
            assert text in error.details(), (kind, error.details())
            assert _count(coordinator, Update) == 0, kind
            root = coordinator.artifacts.root
            assert not [p for p in (root / "incoming").rglob("*") if p.is_file()], kind
    honest = honest_int8() if fields is INT8_FIELDS else honest_topk()
    silo.upload(job.id, 1, save(honest))
    wait_until(lambda: coordinator.scheduler.status(job.id).current_round == 1)
    checkpoint = load(coordinator.artifacts.checkpoint_path(job.id, 1).read_bytes())
    for name, value in load(initial).items():
        decoded = np.zeros(value.size, np.float32)
        if fields is INT8_FIELDS:
            decoded = honest[name].astype(np.float32).reshape(-1) * honest[f"{name}.__scale"][0]
        else:
            decoded[honest[f"{name}.__indices"]] = honest[name]
        np.testing.assert_allclose(checkpoint[name], value + decoded.reshape(value.shape), rtol=1e-6, atol=1e-7)


def test_a_jobs_update_limits_bound_what_an_encoded_update_decodes_to(coordinator: Coordinator) -> None:
    target = address(coordinator)
    silo = RawSilo(target, enroll(coordinator, "a"))
    silo.poll()
    options = struct_pb2.Struct()
    options.update({"max_abs_value": 0.07, "max_update_norm": 1.0})
    algorithm = common_pb2.AlgorithmSpec(name="fedavg", options=options)
    job = submit_raw(target, job_spec(algorithm=algorithm, **INT8_FIELDS), weights_bytes())
    assert silo.poll(wait=5) is not None
    # b decodes to 0, 0.02, ..., 0.08: over 0.07, though every scale (0.01, 0.02) and every int8 is small
    error = _rpc_error(lambda: silo.upload(job.id, 1, save(honest_int8()), chunk=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "magnitude 0.08" in error.details(), error.details()
    large = _with_scale(honest_int8(), "a.__scale", 0.2)  # a decodes to -1.2 .. 1.0: norm 2.6 (and values over 0.07)
    error = _rpc_error(lambda: silo.upload(job.id, 1, save(large)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert _count(coordinator, Update) == 0
    silo.upload(job.id, 1, save(_with_scale(honest_int8(), "b.__scale", 0.017)))  # at most 0.068, norm 0.15


def _with_scale(update: dict, name: str, value: float) -> dict:
    return {**update, name: np.array([value], np.float32)}
