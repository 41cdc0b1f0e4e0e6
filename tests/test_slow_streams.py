"""Slow and idle upload streams: cut at the configured pace, capped in number, and no obstacle to an honest silo.

The issue asks for 100 streams sending a byte a second; they are 100 here too (each is a sleeping client thread
and, while it holds an upload slot, a coroutine on the coordinator's event loop: cheap on 2 cores). A stream takes
its slot once its header says how large it is: one that never sends a header holds none, and is cut all the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError
from safetensors.numpy import save
from sqlalchemy import func, select

from coordinator.pacing import PacedStream
from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from coordinator.store.models import Update
from fedmeki_core.errors import StalledError
from fedmeki_core.proto.v1 import common_pb2, silo_pb2, silo_pb2_grpc
from silo_agent.transport import GrpcTransport
from tests.conftest import address, coordinator_settings, enroll, serving
from tests.silo_wire import TASK, RawSilo, job_spec, submit_raw, tensors, update_messages, weights_bytes

WINDOW = 2.0  # upload_idle_seconds
CAP = 16  # max_concurrent_uploads
SLOW_STREAMS = 100
HEADERLESS = SLOW_STREAMS // 4  # every 4th stream sends nothing


def _trickle(
    messages: list[silo_pb2.UploadUpdateRequest], stop: threading.Event
) -> Iterator[silo_pb2.UploadUpdateRequest]:
    """The header, then the update one byte a second; with no header (every 4th), a stream that sends nothing."""
    if messages:
        yield messages[0]
    for message in messages[1:]:
        for i in range(len(message.chunk.data)):
            if stop.wait(1.0):
                return
            yield silo_pb2.UploadUpdateRequest(
                chunk=common_pb2.Chunk(offset=message.chunk.offset + i, data=message.chunk.data[i : i + 1])
            )
    stop.wait()


@pytest.fixture
def paced_coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    settings = coordinator_settings(
        tmp_path / "coordinator", upload_idle_seconds=WINDOW, upload_min_bytes_per_second=64, max_concurrent_uploads=CAP
    )
    yield from serving(Coordinator(settings))


def test_slow_streams_are_cut_capped_and_the_honest_silo_gets_through(
    paced_coordinator: Coordinator, tmp_path: Path
) -> None:
    coordinator = paced_coordinator
    target = address(coordinator)
    slow = [RawSilo(target, enroll(coordinator, f"slow-{i}")) for i in range(SLOW_STREAMS)]
    honest_credential = enroll(coordinator, "honest")
    honest = GrpcTransport(target, honest_credential, retry_max_seconds=30)
    for silo in slow:
        silo.poll()
    honest.next_task([TASK], "cpu", 0)
    job = submit_raw(target, job_spec(rounds=1, round_deadline_seconds=600), weights_bytes(seed=1))
    task = honest.next_task([TASK], "cpu", 5)
    assert task is not None

    stop = threading.Event()
    channels = [grpc.insecure_channel(target) for _ in slow]
    started = time.monotonic()
    calls = []
    ended: dict[int, float] = {}
    for index, (silo, channel) in enumerate(zip(slow, channels, strict=True)):
        messages = [] if index % 4 == 0 else update_messages(job.id, 1, save(tensors(9.0)), chunk=1 << 20)
        stub = silo_pb2_grpc.SiloServiceStub(channel)
        call = stub.UploadUpdate.future(_trickle(messages, stop), metadata=silo.metadata, timeout=120)
        call.add_done_callback(lambda _, index=index: ended.__setitem__(index, time.monotonic() - started))
        calls.append(call)
    try:
        give_up = time.monotonic() + 20
        refused = SLOW_STREAMS - HEADERLESS - CAP
        while coordinator.slots.uploads.in_use < CAP or sum(call.done() for call in calls) < refused:
            assert time.monotonic() < give_up, f"{coordinator.slots.uploads.in_use} uploads in progress"
            time.sleep(0.05)

        delta = tmp_path / "honest-delta.safetensors"
        delta.write_bytes(save(tensors(0.5)))
        honest.upload(task, delta, hashlib.sha256(delta.read_bytes()).hexdigest(), 10, {})  # retries while busy
        honest_done = time.monotonic() - started
        for call in calls:
            call.exception(timeout=30)
    finally:
        stop.set()
        for channel in channels:
            channel.close()
        honest.close()

    codes = [call.exception().code() for call in calls]
    busy = [call for call, code in zip(calls, codes, strict=True) if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    cut = [call for call, code in zip(calls, codes, strict=True) if code == grpc.StatusCode.DEADLINE_EXCEEDED]
    assert len(busy) == refused and len(cut) == CAP + HEADERLESS, codes
    assert all("max_concurrent_uploads" in call.exception().details() for call in busy)
    assert all("upload stalled" in call.exception().details() for call in cut)
    cut_after = [ended[index] for index, code in enumerate(codes) if code == grpc.StatusCode.DEADLINE_EXCEEDED]
    assert min(cut_after) >= WINDOW and max(cut_after) < WINDOW + 4, cut_after
    assert WINDOW <= honest_done < WINDOW + 8, f"the honest upload finished after {honest_done:.1f}s"

    with coordinator.database.read() as session:
        assert session.scalar(select(func.count()).select_from(Update)) == 1
    # A cut stream's bytes are held for its silo to resume (until the round closes): one file per cut stream that
    # had sent any, nothing else.
    held = [p for p in (coordinator.artifacts.root / "incoming").rglob("*") if p.is_file()]
    trickled = [i for i, code in enumerate(codes) if code == grpc.StatusCode.DEADLINE_EXCEEDED and i % 4 != 0]
    assert sorted(p.suffix for p in held) == [".part"] * len(trickled)
    assert coordinator.slots.uploads.in_use == 0


async def _timed(gaps: list[float]) -> AsyncIterator[bytes]:
    for gap in gaps:
        await asyncio.sleep(gap)
        yield b"x" * 100


async def _all(stream: PacedStream[bytes]) -> list[bytes]:
    async with stream:
        return [message async for message in stream]


def test_a_stream_is_judged_per_window_of_waiting() -> None:
    # 100 bytes every 0.1 s passes a floor of 500 bytes per second; the same with a pause of 0.8 s does not.
    assert len(asyncio.run(_all(PacedStream(_timed([0.1] * 12), 0.3, 500, len)))) == 12
    with pytest.raises(StalledError, match="upload stalled"):
        asyncio.run(_all(PacedStream(_timed([0.1, 0.1, 0.8, 0.1]), 0.3, 500, len)))
    with pytest.raises(StalledError, match="0 messages"):  # no floor: only a window without any message is cut
        asyncio.run(_all(PacedStream(_timed([1.0]), 0.2, 0, len)))


def test_the_caps_stay_below_the_rpc_limit() -> None:
    with pytest.raises(ValidationError, match="max_concurrent_uploads"):
        CoordinatorSettings(maximum_concurrent_rpcs=2048, max_concurrent_uploads=2048)
