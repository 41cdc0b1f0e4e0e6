"""The one publisher of job events: watchers get rounds, updates, uploads and the job as stored; long polls wake."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from sqlalchemy import select

from coordinator.eligibility import Eligibility
from coordinator.events import EventBus
from coordinator.store.database import Database
from coordinator.store.models import Round
from coordinator.store.views import job_status, round_summary
from fedmeki_core.records import UpdateAccepted, UploadProgress


class Publisher:
    """Tells watchers (`EventBus`) what happened, and silos waiting in a long poll that something changed.

    A waiter reads `generation`, looks for work, then awaits `wait_for_change(seen)`: a change published between
    its look and its wait makes the wait return at once, so none is missed. A waiter is a future on the event loop,
    not a thread: publishers (the scheduler's thread, the blocking pool) wake them with `call_soon_threadsafe`.
    """

    def __init__(self, database: Database, events: EventBus, eligibility: Eligibility) -> None:
        self._db = database
        self._events = events
        self._eligibility = eligibility  # a waiting round's snapshot names the silos it could select
        self._lock = threading.Lock()
        self._generation = 0
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    @property
    def waiting(self) -> int:
        """How many long polls wait for a change now."""
        with self._lock:
            return len(self._waiters)

    async def wait_for_change(self, seen: int, timeout: float) -> None:
        """Return when the generation moves past `seen`, or after `timeout` seconds."""
        waiter = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._generation != seen:
                return
            self._waiters.add(waiter)
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:  # also when the poll is cancelled (its silo went away): no waiter is left behind
            with self._lock:
                self._waiters.discard(waiter)

    def work_changed(self) -> None:
        """Wake long polls: a round opened or closed, a job ended, a ring moved on. Any thread may call it."""
        with self._lock:
            self._generation += 1
            loops = {waiter.get_loop() for waiter in self._waiters}
        for loop in loops:
            with contextlib.suppress(RuntimeError):  # that loop has closed: its waiters are gone with it
                loop.call_soon_threadsafe(self._release, loop)

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            waiters = [waiter for waiter in self._waiters if waiter.get_loop() is loop]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def job_changed(self, job_id: str, *round_numbers: int) -> None:
        """Wake long polls and tell watchers: the changed rounds, then the job as stored. A job nobody watches is
        not read (a 256-silo job's status is a large read, and every round's commit changes it)."""
        self.work_changed()
        if not self._events.watched(job_id):
            return
        with self._db.read() as session:
            for round_row in session.scalars(
                select(Round).where(Round.job_id == job_id, Round.number.in_(round_numbers)).order_by(Round.number)
            ):
                self._events.publish(job_id, round_summary(session, round_row))
            self._events.publish(job_id, job_status(session, job_id, self._eligibility.names))

    def update_accepted(self, job_id: str, event: UpdateAccepted) -> None:
        self._events.publish(job_id, event)

    def upload_progress(self, job_id: str, event: UploadProgress) -> None:
        self._events.publish(job_id, event)
