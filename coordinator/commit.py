"""A round's end: fold every recorded update, write the next checkpoint, commit the round in one transaction."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import select

from coordinator.aggregation import AggregationError
from coordinator.artifacts import Artifacts
from coordinator.effects import Effects, fire
from coordinator.modes import Modes
from coordinator.publisher import Publisher
from coordinator.retention import Retention
from coordinator.round_table import Event
from coordinator.rounds import current_round
from coordinator.store.database import Database
from coordinator.store.models import Checkpoint, Update
from coordinator.store.views import get_job_row, manifest_of
from fedmeki_core.faults import crash_point
from fedmeki_core.records import JobState, RoundState
from fedmeki_core.stored_spec import read_stored_spec

logger = logging.getLogger(__name__)


class Commit:
    def __init__(
        self,
        database: Database,
        artifacts: Artifacts,
        modes: Modes,
        effects: Effects,
        retention: Retention,
        publisher: Publisher,
        lock: threading.RLock,
        clock: Callable[[], datetime],
    ) -> None:
        self._db = database
        self._artifacts = artifacts
        self._modes = modes
        self._effects = effects
        self._retention = retention
        self._publisher = publisher
        self._lock = lock
        self._now = clock

    def aggregate(self, job_id: str) -> None:
        """Fold every recorded update, write the next checkpoint, then commit the round in one transaction."""
        with self._db.read() as session:
            job = get_job_row(session, job_id)
            round_row = current_round(session, job)
            spec = read_stored_spec(job.spec)
            manifest = manifest_of(job)
            updates = session.scalars(
                select(Update)
                .where(Update.job_id == job_id, Update.round_number == round_row.number)
                .order_by(Update.silo_id)
            ).all()
            current = session.get(Checkpoint, (job_id, job.current_round))
            assert current is not None
            number, selected = round_row.number, list(round_row.selected)
        started = time.monotonic()
        try:
            path, size, sha256 = self._modes.of(job_id, spec).aggregate(number, manifest, selected, updates, current)
        except AggregationError as exc:  # no retry can help: the round and the job fail with the reason
            with self._lock, self._db.transaction() as session:
                job = get_job_row(session, job_id)
                round_row = current_round(session, job)
                if round_row.number == number and round_row.state == RoundState.AGGREGATING.value:
                    self._effects.fail(session, job, round_row, self._now(), f"round {number}: {exc.message}")
            self._publisher.job_changed(job_id, number)
            return
        crash_point("coordinator.checkpoint_written")
        with self._lock, self._db.transaction() as session:
            job = get_job_row(session, job_id)
            round_row = current_round(session, job)
            if round_row.number != number or round_row.state != RoundState.AGGREGATING.value:
                return  # cancelled meanwhile
            now = self._now()
            rule = fire(round_row, Event.AGGREGATED, now)
            assert rule is not None
            session.merge(
                Checkpoint(
                    job_id=job_id,
                    round_number=number,
                    path=self._artifacts.relative(path),
                    size_bytes=size,
                    sha256=sha256,
                    created_at=now,
                )
            )
            job.current_round = number
            job.updated_at = now
            expired = self._effects.apply(session, job, round_row, rule, now, spec, updates)
            ended = JobState(job.state).finished
        crash_point("coordinator.round_committed")
        logger.info(
            "job %s: round %d committed from %d updates in %.2fs (checkpoint %s)",
            job_id,
            number,
            len(updates),
            time.monotonic() - started,
            sha256[:12],
        )
        if ended:  # whoever waits for the job's end finds the files it made garbage gone
            self._retention.after_commit(job_id, number, expired)
            self._publisher.job_changed(job_id, number, number + 1)
        else:  # the silos hear of the next round first: recycling the round's files (zeroing them) is off their path
            self._publisher.job_changed(job_id, number, number + 1)
            self._retention.after_commit(job_id, number, expired)
