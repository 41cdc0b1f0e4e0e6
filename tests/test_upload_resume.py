"""Resumable uploads: an upload that breaks off leaves its bytes with the coordinator, `UploadOffset` says how many,
and the next upload of the same delta sends only the rest; the result is the update one stream would have given."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import save

from coordinator.server import Coordinator
from fedmeki_core.proto.v1 import silo_pb2
from fedmeki_core.records import RoundState
from tests.conftest import address, coordinator_settings, enroll, serving
from tests.silo_wire import RawSilo, job_spec, submit_raw, update_messages, weights_bytes

CHUNK = 16


def _delta(value: float) -> bytes:
    return save({"a": np.full((4, 3), value, np.float32), "b": np.full((5,), value, np.float32)})


def _offset(silo: RawSilo, job_id: str, payload: bytes) -> int:
    request = silo_pb2.UploadOffsetRequest(job_id=job_id, round=1, sha256=hashlib.sha256(payload).hexdigest())
    return int(silo.call("UploadOffset", request).offset)


def _break_off(silo: RawSilo, job_id: str, payload: bytes, chunks: int) -> None:
    """The header and `chunks` chunks, then silence: the coordinator cuts the stalled stream and keeps the bytes.
    (A cancelled call would do the same, but a cancellation can overtake chunks still in flight.)"""
    messages = update_messages(job_id, 1, payload, chunk=CHUNK)
    cut = threading.Event()

    def stream() -> Iterator[silo_pb2.UploadUpdateRequest]:
        yield from messages[: chunks + 1]
        cut.wait(30)

    try:
        with pytest.raises(grpc.RpcError) as stalled:
            silo.upload_messages(stream())
        assert stalled.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        cut.set()


@pytest.fixture
def cutting_coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    """Stalled uploads are cut after a second without a message."""
    settings = coordinator_settings(tmp_path / "coordinator", upload_idle_seconds=1.0, upload_min_bytes_per_second=0)
    yield from serving(Coordinator(settings))


@pytest.fixture
def job(cutting_coordinator: Coordinator) -> tuple[RawSilo, str]:
    silo = RawSilo(address(cutting_coordinator), enroll(cutting_coordinator, "a"))
    silo.poll()
    job = submit_raw(address(cutting_coordinator), job_spec(min_silos=1), weights_bytes())
    give_up = time.monotonic() + 10
    while not (rounds := cutting_coordinator.scheduler.status(job.id).rounds) or rounds[0].state != RoundState.TRAINING:
        assert time.monotonic() < give_up
        time.sleep(0.02)
    return silo, job.id


def test_a_broken_off_upload_resumes_from_the_held_offset(
    cutting_coordinator: Coordinator, job: tuple[RawSilo, str]
) -> None:
    silo, job_id = job
    payload = _delta(0.5)
    assert _offset(silo, job_id, payload) == 0
    _break_off(silo, job_id, payload, chunks=3)
    assert _offset(silo, job_id, payload) == 3 * CHUNK
    assert _offset(silo, job_id, _delta(0.25)) == 0  # another delta's bytes do not count

    rest = [m for m in update_messages(job_id, 1, payload, chunk=CHUNK) if m.chunk.offset >= 3 * CHUNK]
    header = update_messages(job_id, 1, payload, chunk=CHUNK)[0]
    header.header.offset = 3 * CHUNK
    receipt = silo.upload_messages([header, *rest])
    assert (receipt.size_bytes, receipt.sha256) == (len(payload), hashlib.sha256(payload).hexdigest())
    root = cutting_coordinator.artifacts.root
    with pytest.raises(grpc.RpcError) as done:
        _offset(silo, job_id, payload)
    assert done.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert not list((root / "incoming").rglob("*.part"))


def test_a_resume_at_an_offset_not_held_is_refused_and_a_bad_resume_leaves_nothing(
    cutting_coordinator: Coordinator, job: tuple[RawSilo, str]
) -> None:
    silo, job_id = job
    payload = _delta(0.5)
    # A stream that ends short, as a killed silo's does (its connection closes): refused, and its bytes held.
    with pytest.raises(grpc.RpcError) as short:
        silo.upload_messages(update_messages(job_id, 1, payload, chunk=CHUNK)[:3])
    assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in short.value.details()
    assert _offset(silo, job_id, payload) == 2 * CHUNK
    messages = update_messages(job_id, 1, payload, chunk=CHUNK)
    header = messages[0]
    header.header.offset = 3 * CHUNK
    with pytest.raises(grpc.RpcError) as wrong:
        silo.upload_messages([header, *[m for m in messages[1:] if m.chunk.offset >= 3 * CHUNK]])
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{2 * CHUNK} bytes of this update are held" in wrong.value.details()
    assert _offset(silo, job_id, payload) == 2 * CHUNK  # the refusal kept what is held

    # Resumed at the right offset with other bytes after it: rejected as a whole (sha256), nothing kept.
    damaged = bytearray(payload)
    damaged[-1] ^= 0xFF
    header.header.offset = 2 * CHUNK
    tail = [m for m in update_messages(job_id, 1, bytes(damaged), chunk=CHUNK)[1:] if m.chunk.offset >= 2 * CHUNK]
    with pytest.raises(grpc.RpcError) as bad:
        silo.upload_messages([header, *tail])
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in bad.value.details()
    assert _offset(silo, job_id, payload) == 0
    assert not list(Path(cutting_coordinator.artifacts.root / "incoming").rglob("*.part"))


def test_a_resume_below_the_held_bytes_is_refused_and_keeps_them(
    cutting_coordinator: Coordinator, job: tuple[RawSilo, str]
) -> None:
    """A silo that resumes before the held bytes (it lost count, or another of its processes sent more) gets
    FAILED_PRECONDITION, as above the held bytes, and what is held stays for the right resume."""
    silo, job_id = job
    payload = _delta(0.5)
    _break_off(silo, job_id, payload, chunks=3)
    assert _offset(silo, job_id, payload) == 3 * CHUNK
    messages = update_messages(job_id, 1, payload, chunk=CHUNK)
    header = messages[0]
    header.header.offset = CHUNK
    with pytest.raises(grpc.RpcError) as below:
        silo.upload_messages([header, *[m for m in messages[1:] if m.chunk.offset >= CHUNK]])
    assert below.value.code() == grpc.StatusCode.FAILED_PRECONDITION, below.value.details()
    assert f"resumes at byte {CHUNK}, but {3 * CHUNK} bytes of this update are held" in below.value.details()
    assert _offset(silo, job_id, payload) == 3 * CHUNK  # the refusal kept what is held

    header.header.offset = 3 * CHUNK
    receipt = silo.upload_messages([header, *[m for m in messages[1:] if m.chunk.offset >= 3 * CHUNK]])
    assert (receipt.size_bytes, receipt.sha256) == (len(payload), hashlib.sha256(payload).hexdigest())
