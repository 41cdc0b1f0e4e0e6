"""Uploads under a pace and a cap: a client stream that stalls is cut, and only so many run at once.

gRPC gives a handler no timeout on the next message of a client stream, so a few silos trickling bytes could hold
their uploads' slots for ever. `PacedStream` reads each message in a task on the event loop (never cancelled) and cuts
the stream when a window of waiting brings too little. `Slots` refuses a call beyond its kind's cap instead of
queueing it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from coordinator.settings import CoordinatorSettings
from fedmeki_core.errors import BusyError, StalledError, UnavailableError
from fedmeki_core.proto.v1 import common_pb2

T = TypeVar("T")


class _CarriesChunk(Protocol):
    @property
    def chunk(self) -> common_pb2.Chunk: ...


Chunked = TypeVar("Chunked", bound=_CarriesChunk)


class PacedStream(Generic[T]):
    """The messages of `messages`, cut with StalledError when a window of `window_seconds` during which the
    handler waits brings no message, or fewer than `min_bytes_per_second * window_seconds` bytes (`size`).

    Windows run while the handler is waiting for the client: time the handler spends on a message is not held
    against the client. A stream whose call ended under it (its connection lost) raises UnavailableError. Use it
    as an async context manager: leaving it abandons the read in progress, which ends with the call.

    A read of `messages` is never cancelled: a grpc.aio read cancelled in flight never parses the message that
    then arrives, and its buffer is never freed. Each read runs in a task of its own that the handler waits for
    (a cancelled wait leaves it running), timed by one timer per wait; an abandoned read is left to finish.
    """

    def __init__(
        self,
        messages: AsyncIterable[T],
        window_seconds: float,
        min_bytes_per_second: float,
        size: Callable[[T], int],
    ) -> None:
        self._messages = aiter(messages)
        self._window = window_seconds
        self._min_bytes = min_bytes_per_second * window_seconds
        self._size = size
        self._reading: asyncio.Task[T] | None = None  # the read of the next message, kept across windows
        self._window_end = time.monotonic() + window_seconds
        self._window_bytes = 0
        self._window_messages = 0

    @classmethod
    def of_chunks(cls, messages: AsyncIterable[Chunked], settings: CoordinatorSettings) -> PacedStream[Chunked]:
        """A client stream of chunk messages (a submission's weights, an upload), paced by the upload settings and
        counted by the chunks' bytes."""
        return PacedStream(
            messages,
            settings.upload_idle_seconds,
            settings.upload_min_bytes_per_second,
            lambda message: len(message.chunk.data),
        )

    async def __aenter__(self) -> PacedStream[T]:
        return self

    async def __aexit__(self, *_: object) -> None:
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.add_done_callback(_retrieve)  # a read that ends after the call (StopAsyncIteration) is not logged

    def __aiter__(self) -> PacedStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._reading is None:
            self._reading = asyncio.ensure_future(anext(self._messages))
        while not self._reading.done():
            remaining = self._window_end - time.monotonic()
            if remaining > 0:
                await _done_or_timed_out(self._reading, remaining)
            else:
                self._next_window()
        reading, self._reading = self._reading, None
        try:
            message = reading.result()
        except StopAsyncIteration:
            raise
        except Exception as exc:  # the call ended under the read: its connection died
            raise UnavailableError(
                "the upload's stream ended before its last message: the client cancelled it or its "
                "connection was lost (keepalive)"
            ) from exc
        self._window_bytes += self._size(message)
        self._window_messages += 1
        return message

    def _next_window(self) -> None:
        if not self._window_messages or self._window_bytes < self._min_bytes:
            raise StalledError(
                f"upload stalled: {self._window_messages} messages and {self._window_bytes} bytes in "
                f"{self._window:g} s, below the minimum of {self._min_bytes:g} bytes per {self._window:g} s "
                "(upload_idle_seconds, upload_min_bytes_per_second); the stream is cut"
            )
        self._window_end = time.monotonic() + self._window
        self._window_bytes = self._window_messages = 0


async def _done_or_timed_out(reading: asyncio.Task[T], timeout: float) -> None:
    """Wait until `reading` is done or `timeout` seconds have passed. Cancelled, it stops waiting and leaves `reading`
    running. One future and one timer: `asyncio.wait` would add a set, a callback per awaitable and a timeout."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    reading.add_done_callback(wake)
    timer = loop.call_later(timeout, wake, None)
    try:
        await waiter
    finally:
        timer.cancel()
        reading.remove_done_callback(wake)


def _retrieve(reading: asyncio.Task[T]) -> None:
    if not reading.cancelled():
        reading.exception()


class Slots:
    """At most `limit` calls of one kind at once; one more is refused with BusyError (RESOURCE_EXHAUSTED, marked
    retry-later), not queued: each holds memory (buffers, a spool, a subscription) while it lasts."""

    def __init__(self, limit: int, what: str, setting: str) -> None:
        self._limit = limit
        self._what = what
        self._setting = setting
        self._in_use = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._in_use

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            if self._in_use >= self._limit:
                raise BusyError(
                    f"{self._limit} {self._what} are in progress, the most this coordinator takes at once "
                    f"({self._setting}); retry later"
                )
            self._in_use += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use -= 1


@dataclass(frozen=True)
class CallSlots:
    """The caps on the calls that last: uploads, submissions, WatchJob streams, long polls. None of them holds a
    thread while it waits for its client (they are coroutines); the caps bound the memory and the blocking work
    that many of them at once would take."""

    uploads: Slots
    submissions: Slots
    watches: Slots
    polls: Slots

    @classmethod
    def of(cls, uploads: int, submissions: int, watches: int, polls: int) -> CallSlots:
        return cls(
            uploads=Slots(uploads, "uploads", "max_concurrent_uploads"),
            submissions=Slots(submissions, "job submissions", "max_concurrent_submissions"),
            watches=Slots(watches, "WatchJob streams", "max_concurrent_watches"),
            polls=Slots(polls, "long polls", "max_concurrent_polls"),
        )
