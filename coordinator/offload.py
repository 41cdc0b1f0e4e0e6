"""Offload: the one bounded thread pool where the coordinator's blocking work runs (database, files, CPU on bytes).

The gRPC server runs on one asyncio event loop; a waiting call costs a coroutine, not a thread. Anything that may
block (a transaction, a fsync, validating a chunk) is handed to this pool, whose size is `blocking_workers`: the
coordinator's threads are bounded by its settings whatever the number of silos.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_END = object()


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

    async def iterate(self, items: Iterator[T]) -> AsyncIterator[T]:
        """The items of a blocking iterator (a file read chunk by chunk), each produced on the pool."""
        try:
            while (item := await self.run(next, items, _END)) is not _END:
                yield item  # type: ignore[misc]
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                await self.run(close)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


async def _settled(future: asyncio.Future[T]) -> None:
    """Wait for `future` to finish without cancelling it, whatever cancellations come meanwhile."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait((future,))
    if not future.cancelled():
        future.exception()  # retrieved: the call is ending anyway, its error has nobody to go to
