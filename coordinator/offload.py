"""Offload: the one bounded thread pool where the coordinator's blocking work runs (database, files, CPU on bytes).

The gRPC server runs on one asyncio event loop; a waiting call costs a coroutine, not a thread. Anything that may
block (a transaction, a fsync, validating and writing chunks, a batch at a time) is handed to this pool, whose size
is `blocking_workers`: the coordinator's threads are bounded by its settings whatever the number of silos.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

BATCH_BYTES = 1 << 20  # bytes handed to the pool at once by `consume`, or read by it per hop of `iterate`
# A large upload's batches: `consume` holds two per upload, so 16 large uploads at once hold 8 MiB rather than 32 MiB
# (docs/benchmarks.md, "Sums made at close"); four times the hand-overs cost a large upload about 2-4% more CPU.
LARGE_UPLOAD_BATCH_BYTES = 1 << 18


def upload_batch_bytes(remaining: int) -> int:
    """The batch for an upload of `remaining` bytes: one of up to BATCH_BYTES goes over whole, in one hand-over
    (hundreds of small silos' uploads cost a hand-over each, not four), a larger one in smaller batches."""
    return BATCH_BYTES if remaining <= BATCH_BYTES else LARGE_UPLOAD_BATCH_BYTES


def per_hop(item_bytes: int) -> int:
    """How many items of `item_bytes` make a batch of about BATCH_BYTES (at least one)."""
    return max(1, BATCH_BYTES // item_bytes)


class Offload:
    def __init__(self, workers: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedmeki-blocking")

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`function(*args, **kwargs)` on the pool. A call cancelled meanwhile (its client went away) still waits for
        the function to finish before it ends: a transaction or a write is never left running under the code that
        cleans up after it."""
        call = functools.partial(function, *args, **kwargs)
        future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await _settled(future)
            raise

    async def iterate(self, items: Iterator[T], per_hop: int = 1) -> AsyncIterator[T]:
        """The items of a blocking iterator (a file read chunk by chunk), produced on the pool `per_hop` at a time:
        one hand-over to the pool and back per `per_hop` items, not per item."""
        try:
            while batch := await self.run(_take, items, per_hop):
                for item in batch:
                    yield item
                if len(batch) < per_hop:
                    return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                await self.run(close)

    async def consume(
        self,
        items: AsyncIterable[T],
        consume: Callable[[list[T]], None],
        size: Callable[[T], int],
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        """`consume` every item of `items` on the pool, in order, in batches: while the pool works on one batch the
        loop gathers the next, until it holds `batch_bytes` (`size` of each item) and waits. One hand-over per batch
        instead of per item (a hand-over wakes a pool thread, then the loop: on busy cores each wake-up waits its
        turn), and reading overlaps the work; at most two batches are held, so the producer feels back-pressure.

        An error of `consume` ends the iteration as soon as it is raised, even while the loop waits for the next
        item; the items after the failing one are never consumed. A stream that breaks off (its error, or the call
        cancelled) still has every item it brought consumed before the error goes on, as one item at a time would:
        what came is kept for a resumed upload."""
        source = aiter(items)
        working: asyncio.Future[None] | None = None
        batch: list[T] = []
        held = 0
        try:
            while True:
                try:
                    item = await _next_unless_failed(source, working)
                except StopAsyncIteration:
                    break
                batch.append(item)
                held += size(item)
                if working is not None and not working.done() and held < batch_bytes:
                    continue
                if working is not None:
                    await asyncio.shield(working)  # raises what `consume` raised; a cancellation does not stop it
                working = asyncio.ensure_future(self.run(consume, batch))
                batch, held = [], 0
            if working is not None:
                await asyncio.shield(working)
            if batch:
                last, batch = batch, []  # handed over: an error of its own does not hand it over again below
                await self.run(consume, last)
        except BaseException:
            if working is not None:
                await _settled(working)
                if working.exception() is not None:
                    raise  # consume's own error: nothing after it is consumed
            if batch:
                await self.run(consume, batch)
            raise

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


def _take(items: Iterator[T], count: int) -> list[T]:
    return list(itertools.islice(items, count))


async def _next_unless_failed(source: AsyncIterator[T], working: asyncio.Future[None] | None) -> T:
    """The next item of `source`, read in the calling task; when `working` (the pool's batch) fails first, its error,
    without waiting for the item (a client may send nothing more): the failure cancels the read, and the cancellation
    becomes the error. `source` must take a cancelled read without losing more than that read (PacedStream does).
    One done-callback instead of a task and an `asyncio.wait` per item."""
    if working is None or working.done():
        if working is not None:
            working.result()
        return await anext(source)
    task = asyncio.current_task()
    assert task is not None  # a coroutine of the event loop
    reading = True
    failed = False

    def interrupt(done: asyncio.Future[None]) -> None:
        nonlocal failed
        # a callback scheduled before the read returned finds it over and leaves the task alone
        if reading and not done.cancelled() and done.exception() is not None:
            failed = True
            task.cancel()

    working.add_done_callback(interrupt)
    try:
        return await anext(source)
    except asyncio.CancelledError:
        if failed and task.uncancel() == 0:  # cancelled by the failure alone, not by the call going away
            error = working.exception()
            assert error is not None
            raise error from None
        raise
    finally:
        reading = False
        working.remove_done_callback(interrupt)


async def _settled(future: asyncio.Future[T]) -> None:
    """Wait for `future` to finish without cancelling it, whatever cancellations come meanwhile."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait((future,))
    if not future.cancelled():
        future.exception()  # retrieved: the call is ending anyway, its error has nobody to go to
