"""Coalescer: the same blocking step asked for by many calls at once runs once, on the blocking pool, for all of them.

A change of work wakes every waiting long poll, and each then looks at the database; hundreds of silos polling
made that hundreds of identical queries (and each poll's touch of its silo row a transaction of its own). Here
the calls that ask while no batch runs form the next batch: one call of `function(items)` on the pool answers
them all, in order; calls that ask meanwhile wait for the batch after it. A batch runs as soon as the one before
it ends, so a lone call waits for nothing but its own batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from coordinator.offload import Offload

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """`await ask(item)`: `function(batch)[i]` for the item's place i in its batch. `function` returns one result
    per item, in order, or an exception instance for an item that failed alone (raised in that item's call); an
    exception it raises fails the whole batch."""

    def __init__(self, offload: Offload, function: Callable[[Sequence[T]], Sequence[R | Exception]]) -> None:
        self._offload = offload
        self._function = function
        # Per event loop (a coordinator has one; tests may run several): the items waiting for the next batch, and
        # the task running batches while there are any.
        self._waiting: dict[asyncio.AbstractEventLoop, list[tuple[T, asyncio.Future[R]]]] = {}
        self._runners: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}

    async def ask(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.setdefault(loop, []).append((item, future))
        if loop not in self._runners:
            self._runners[loop] = loop.create_task(self._run_batches(loop))
        return await future  # cancelled (its silo went away), the batch still runs for the others

    async def _run_batches(self, loop: asyncio.AbstractEventLoop) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while batch := self._waiting.pop(loop, []):
                try:
                    results = await self._offload.run(self._function, [item for item, _ in batch])
                except Exception as exc:  # each caller gets it as its own call's error
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:  # cancelled (the loop is shutting down): no caller is left waiting for ever
            self._runners.pop(loop, None)
            for _, future in batch + self._waiting.pop(loop, []):
                future.cancel()
