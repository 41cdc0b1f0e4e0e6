"""In-process fan-out of job events to WatchJob subscribers.

Events are notifications; the database stays the truth. A subscriber that falls behind loses its oldest
events (and gets a fresh snapshot from the database when it next asks), never blocks the publisher.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from fedmeki_core.records import JobEvent

_QUEUE_LIMIT = 1024


class Subscription:
    def __init__(self) -> None:
        self._queue: queue.Queue[JobEvent] = queue.Queue(maxsize=_QUEUE_LIMIT)

    def put(self, event: JobEvent) -> None:
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()

    def get(self, timeout: float) -> JobEvent | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, set[Subscription]] = defaultdict(set)

    def publish(self, job_id: str, event: JobEvent) -> None:
        with self._lock:
            subscribers = list(self._subscribers.get(job_id, ()))
        for subscription in subscribers:
            subscription.put(event)

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[Subscription]:
        subscription = Subscription()
        with self._lock:
            self._subscribers[job_id].add(subscription)
        try:
            yield subscription
        finally:
            with self._lock:
                self._subscribers[job_id].discard(subscription)
                if not self._subscribers[job_id]:
                    del self._subscribers[job_id]
