"""Uploads under a pace and a cap: a client stream that stalls is cut, and only so many run at once.

gRPC's synchronous server gives a handler no timeout on the next message of a client stream, and each stream
holds a worker thread while it lasts, so a few silos trickling bytes could hold the whole pool. `PacedStream`
reads the stream on a helper thread, one message when the handler asks for it, and cuts the stream when a
window of waiting brings too little. `Slots` refuses a call beyond its kind's cap instead of queueing it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from fedmeki_core.errors import BusyError, StalledError, UnavailableError

T = TypeVar("T")


class PacedStream(Generic[T]):
    """The messages of `messages`, cut with StalledError when a window of `window_seconds` during which the
    handler waits brings no message, or fewer than `min_bytes_per_second * window_seconds` bytes (`size`).

    Windows run while the handler is waiting for the client: time the handler spends on a message is not held
    against the client. A stream whose call ended under it (cancelled, or its connection lost) raises
    UnavailableError. `close()` when done: the helper thread then ends with the call.
    """

    def __init__(
        self, messages: Iterator[T], window_seconds: float, min_bytes_per_second: float, size: Callable[[T], int]
    ) -> None:
        self._window = window_seconds
        self._min_bytes = min_bytes_per_second * window_seconds
        self._size = size
        self._changed = threading.Condition()
        self._wanted = False  # the handler asked for a message the helper has not delivered yet
        self._message: T | None = None
        self._ended = False
        self._error: Exception | None = None  # what reading the stream raised (the client went away)
        self._closed = False
        self._window_end = time.monotonic() + window_seconds
        self._window_bytes = 0
        self._window_messages = 0
        threading.Thread(target=self._read, args=(messages,), name="fedmeki-upload-reader", daemon=True).start()

    def __iter__(self) -> PacedStream[T]:
        return self

    def __next__(self) -> T:
        with self._changed:
            if self._message is None and not self._ended:
                self._wanted = True
                self._changed.notify_all()
            while self._message is None:
                if self._ended:
                    if self._error is not None:  # the call ended under the reader: cancelled, or its connection died
                        raise UnavailableError(
                            "the upload's stream ended before its last message: the client cancelled it or its "
                            "connection was lost (keepalive)"
                        ) from self._error
                    raise StopIteration
                remaining = self._window_end - time.monotonic()
                if remaining > 0:
                    self._changed.wait(remaining)
                else:
                    self._next_window()
            message, self._message = self._message, None
        self._window_bytes += self._size(message)
        self._window_messages += 1
        return message

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _next_window(self) -> None:
        if not self._window_messages or self._window_bytes < self._min_bytes:
            raise StalledError(
                f"upload stalled: {self._window_messages} messages and {self._window_bytes} bytes in "
                f"{self._window:g} s, below the minimum of {self._min_bytes:g} bytes per {self._window:g} s "
                "(upload_idle_seconds, upload_min_bytes_per_second); the stream is cut"
            )
        self._window_end = time.monotonic() + self._window
        self._window_bytes = self._window_messages = 0

    def _read(self, messages: Iterator[T]) -> None:
        error: Exception | None = None
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._wanted or self._closed)
                    if self._closed:
                        return
                message = next(messages)  # blocks until the client sends one, or the call ends
                with self._changed:
                    self._message, self._wanted = message, False
                    self._changed.notify_all()
        except StopIteration:
            pass
        except Exception as exc:  # the call ended under the reader: cancelled by the client, or cut here
            error = exc
        finally:
            with self._changed:
                self._ended, self._error = True, error
                self._changed.notify_all()


class Slots:
    """At most `limit` calls of one kind at once; one more is refused with BusyError (RESOURCE_EXHAUSTED, marked
    retry-later), not queued: each holds a worker thread while it lasts."""

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
    """The caps on the calls that hold a worker for long: uploads, submissions, WatchJob streams, long polls.
    Their sum stays below the worker pool (CoordinatorSettings checks it), so short calls always find a worker."""

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
