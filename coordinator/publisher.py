"""The one publisher of job events: watchers get rounds, updates, uploads and the job as stored; long polls wake."""

from __future__ import annotations

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

    A waiter reads `generation`, looks for work without any lock held, then `wait_for_change(seen)`: a change
    published between its look and its wait makes the wait return at once, so none is missed.
    """

    def __init__(self, database: Database, events: EventBus, eligibility: Eligibility) -> None:
        self._db = database
        self._events = events
        self._eligibility = eligibility  # a waiting round's snapshot names the silos it could select
        self._changed = threading.Condition(threading.Lock())
        self._generation = 0

    @property
    def generation(self) -> int:
        with self._changed:
            return self._generation

    def wait_for_change(self, seen: int, timeout: float) -> None:
        with self._changed:
            if self._generation == seen:
                self._changed.wait(timeout)

    def work_changed(self) -> None:
        """Wake long polls: a round opened or closed, a job ended, a ring moved on."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def job_changed(self, job_id: str, *round_numbers: int) -> None:
        """Wake long polls and tell watchers: the changed rounds, then the job as stored."""
        self.work_changed()
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
