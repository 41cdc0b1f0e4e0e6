"""Offload's byte paths: a stream's items go to the pool in batches (not one hand-over each), in order, with errors and
cancellations kept as strict as one item at a time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from coordinator.offload import BATCH_BYTES, LARGE_UPLOAD_BATCH_BYTES, Offload, upload_batch_bytes


async def _consumed(
    items: AsyncIterator[int], consume: Callable[[list[int]], None], batch_bytes: int = BATCH_BYTES
) -> None:
    """`Offload.consume` of `items`, each counted as one byte, on a pool of 4 made for it and shut down after."""
    offload = Offload(4)
    try:
        await offload.consume(items, consume, lambda _: 1, batch_bytes)
    finally:
        offload.shutdown()


def test_consume_hands_the_pool_batches_in_order_while_the_next_batch_arrives() -> None:
    gate = threading.Event()  # the first batch is held on the pool until the loop has gathered a full second one
    batches: list[list[int]] = []

    def consume(batch: list[int]) -> None:
        gate.wait(30)
        batches.append(batch)

    async def items() -> AsyncIterator[int]:
        for item in range(10):
            if item == 4:
                gate.set()
            yield item

    asyncio.run(_consumed(items(), consume, batch_bytes=4))
    assert [item for batch in batches for item in batch] == list(range(10))
    assert batches[:2] == [[0], [1, 2, 3, 4]]  # the loop read on while the pool worked, up to the bound
    assert len(batches) < 10


def test_consume_raises_the_pools_error_without_waiting_for_a_silent_client() -> None:
    consumed: list[int] = []

    def consume(batch: list[int]) -> None:
        if 1 in batch:
            raise ValueError("bad bytes")
        consumed.extend(batch)

    async def items() -> AsyncIterator[int]:
        yield 0
        yield 1
        yield 2
        await asyncio.Event().wait()  # a client that sends nothing more and keeps its stream open
        yield 3

    with pytest.raises(ValueError, match="bad bytes"):
        asyncio.run(asyncio.wait_for(_consumed(items(), consume, batch_bytes=1), 60))
    assert consumed == [0]  # nothing after the failing batch was consumed


def test_a_batch_that_fails_is_consumed_once() -> None:
    batches: list[list[int]] = []

    def consume(batch: list[int]) -> None:
        batches.append(batch)
        if 1 in batch:
            raise ValueError("bad bytes")

    async def items() -> AsyncIterator[int]:
        yield 0
        yield 1

    with pytest.raises(ValueError, match="bad bytes"):
        asyncio.run(_consumed(items(), consume))
    assert batches == [[0], [1]]


def test_a_stream_that_breaks_off_has_what_it_brought_consumed_before_its_error() -> None:
    gate = threading.Event()
    consumed: list[int] = []

    def consume(batch: list[int]) -> None:
        gate.wait(30)
        consumed.extend(batch)

    async def items() -> AsyncIterator[int]:
        yield 0
        yield 1
        yield 2  # 1 and 2 wait on the loop while the pool holds 0
        gate.set()
        raise ConnectionError("the stream broke off")

    with pytest.raises(ConnectionError):
        asyncio.run(_consumed(items(), consume))
    assert consumed == [0, 1, 2]  # kept, for the upload to resume after them


def test_a_cancelled_consume_ends_only_after_the_batch_in_progress() -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    def consume(batch: list[int]) -> None:
        started.set()
        release.wait(30)
        finished.append(True)

    async def items() -> AsyncIterator[int]:
        yield 0
        await asyncio.Event().wait()
        yield 1

    async def main() -> None:
        offload = Offload(4)
        try:
            task = asyncio.ensure_future(offload.consume(items(), consume, lambda _: 1))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
            task.cancel()
            await asyncio.sleep(0.05)
            assert not task.done()  # still waiting for the batch on the pool
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert finished == [True]
        finally:
            offload.shutdown()

    asyncio.run(main())


def test_iterate_reads_per_hop_items_in_each_hand_over_and_closes_the_source() -> None:
    delivered: list[int] = []
    seen_at: list[int] = []  # how many items the loop had received when the pool read each item
    closed: list[bool] = []

    def source() -> Iterator[int]:
        try:
            for item in range(10):
                seen_at.append(len(delivered))
                yield item
        finally:
            closed.append(True)

    async def main() -> None:
        offload = Offload(4)
        try:
            async for item in offload.iterate(source(), per_hop=3):
                delivered.append(item)
        finally:
            offload.shutdown()

    asyncio.run(main())
    assert delivered == list(range(10))
    assert seen_at == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]
    assert closed == [True]


def test_an_upload_within_one_batch_goes_over_whole_and_a_larger_one_in_smaller_batches() -> None:
    assert upload_batch_bytes(1) == upload_batch_bytes(BATCH_BYTES) == BATCH_BYTES  # one hand-over each
    assert upload_batch_bytes(BATCH_BYTES + 1) == upload_batch_bytes(400 << 20) == LARGE_UPLOAD_BATCH_BYTES
    assert LARGE_UPLOAD_BATCH_BYTES < BATCH_BYTES  # two held per upload: less memory per large upload in flight
