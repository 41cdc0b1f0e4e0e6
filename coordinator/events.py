"""In-process fan-out of job events to WatchJob subscribers.

Events are notifications; the database stays the truth. A subscriber that falls behind loses its oldest
events (and gets a fresh snapshot from the database when it next asks), never blocks the publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager

from fedmeki_core.records import JobEvent

_QUEUE_LIMIT = 1024


class Subscription:
    """One watcher's events, read on the event loop it subscribed from; `put` may be called from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: deque[JobEvent] = deque(maxlen=_QUEUE_LIMIT)  # full: the oldest is dropped
        self._lock = threading.Lock()
        self._arrived = asyncio.Event()

    def put(self, event: JobEvent) -> None:
        with self._lock:
            self._events.append(event)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody reads this subscription any more
            self._loop.call_soon_threadsafe(self._arrived.set)

    async def get(self) -> JobEvent:
        while True:
            with self._lock:
                if self._events:
                    return self._events.popleft()
                self._arrived.clear()  # a put after this sets it again: its call_soon runs after this line
            await self._arrived.wait()


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, set[Subscription]] = defaultdict(set)

    def publish(self, job_id: str, event: JobEvent) -> None:
        with self._lock:
            subscribers = list(self._subscribers.get(job_id, ()))
        for subscription in subscribers:
            subscription.put(event)

    def watched(self, job_id: str) -> bool:
        """Whether the job has a subscriber now. One that subscribes later reads the job from the database after
        subscribing (WatchJob), so an event not built for want of one is not missed."""
        with self._lock:
            return job_id in self._subscribers

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[Subscription]:
        """A subscription read on the running event loop (call it from a coroutine)."""
        subscription = Subscription(asyncio.get_running_loop())
        with self._lock:
            self._subscribers[job_id].add(subscription)
        try:
            yield subscription
        finally:
            with self._lock:
                self._subscribers[job_id].discard(subscription)
                if not self._subscribers[job_id]:
                    del self._subscribers[job_id]
