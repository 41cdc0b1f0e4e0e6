"""Upload streams that end under their handler leave nothing behind on the event loop: no task whose exception
nobody retrieved (asyncio logs those as "Task exception was never retrieved" when they are collected)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from safetensors.numpy import save

from coordinator.offload import Offload
from coordinator.pacing import PacedStream
from coordinator.server import Coordinator
from fedmeki_core.errors import StalledError
from fedmeki_core.proto.v1 import silo_pb2, silo_pb2_grpc
from tests.conftest import address, enroll, wait_until
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, update_messages, weights_bytes

CHUNK = 16
SENT = 4  # chunks sent before the client stops (of 12)


def _unretrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()  # a task is reported when it is collected
    return [record.getMessage() for record in caplog.records if "never retrieved" in record.getMessage()]


def _uploaded_bytes(coordinator: Coordinator) -> float:
    value = coordinator.metrics.registry.get_sample_value(
        "fedmeki_transfer_bytes_total", {"method": "UploadUpdate", "direction": "upload"}
    )
    return value or 0.0


def test_an_upload_its_client_cancels_leaves_no_unretrieved_task(
    sqlite_coordinator: Coordinator, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = sqlite_coordinator
    target = address(coordinator)
    silo = RawSilo(target, enroll(coordinator, "cancelling"))
    silo.poll()
    job = submit_raw(target, job_spec(), weights_bytes(seed=1))
    assert silo.poll(wait=5) is not None
    messages = update_messages(job.id, 1, save(tensors(0.5)), chunk=CHUNK)
    stop = threading.Event()

    def stalling() -> Iterator[silo_pb2.UploadUpdateRequest]:
        yield from messages[: 1 + SENT]
        stop.wait(60)

    caplog.set_level(logging.ERROR, logger="asyncio")
    with silo.channel() as channel:
        call = silo_pb2_grpc.SiloServiceStub(channel).UploadUpdate.future(stalling(), metadata=silo.metadata)
        try:
            # The handler has read what was sent and waits for the next chunk when the client cancels.
            wait_until(lambda: _uploaded_bytes(coordinator) == SENT * CHUNK)
            call.cancel()
            wait_until(lambda: coordinator.slots.uploads.in_use == 0)
        finally:
            stop.set()
    assert call.cancelled()
    assert _unretrieved(caplog) == []


def test_a_stream_that_ends_after_its_bytes_were_refused_leaves_no_unretrieved_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The pool refuses the second chunk while the loop waits for the third, which never comes: the client ends its
    # stream instead, after the refusal and before the handler is gone.
    refused = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"
        await refused.wait()

    def consume(batch: list[bytes]) -> None:
        if b"b" in batch:
            raise ValueError("bad bytes")

    async def main() -> None:
        offload = Offload(2)
        try:
            with pytest.raises(ValueError, match="bad bytes"):
                async with PacedStream(chunks(), 30.0, 0.0, len) as stream:  # as the servicers hold it
                    await offload.consume(stream, consume, len, batch_bytes=1)
            refused.set()
            await asyncio.sleep(0.05)  # the stream's end comes in
        finally:
            offload.shutdown()

    caplog.set_level(logging.ERROR, logger="asyncio")
    asyncio.run(main())
    assert _unretrieved(caplog) == []


def test_a_refused_or_stalled_stream_leaves_its_read_in_flight_to_finish_uncancelled() -> None:
    # A grpc.aio read cancelled in flight never frees the message that then arrives: the handler stops waiting for
    # the read (refused bytes, a stall) but the read itself runs on until its message or the call's end comes.
    async def case(refuse: bool) -> tuple[list[str], list[bytes]]:
        arrive = asyncio.Event()
        seen: list[str] = []

        async def chunks() -> AsyncIterator[bytes]:
            yield b"a"
            yield b"b"
            try:
                await arrive.wait()
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            seen.append("arrived")
            yield b"c"

        consumed: list[bytes] = []

        def consume(batch: list[bytes]) -> None:
            if refuse and b"b" in batch:
                raise ValueError("bad bytes")
            consumed.extend(batch)

        offload = Offload(2)
        try:
            with pytest.raises(ValueError if refuse else StalledError):
                async with PacedStream(chunks(), 0.2, 0.0, len) as stream:
                    await offload.consume(stream, consume, len, batch_bytes=1)
            arrive.set()
            while not seen:
                await asyncio.sleep(0.01)
        finally:
            offload.shutdown()
        return seen, consumed

    assert asyncio.run(case(refuse=True)) == (["arrived"], [b"a"])
    assert asyncio.run(case(refuse=False)) == (["arrived"], [b"a", b"b"])
