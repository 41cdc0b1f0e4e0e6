"""Hands silos their work: the long poll (NextTask), which waits without a lock or a thread, and the cyclic ring's
turns."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from coordinator import cyclic, evaluations, injections
from coordinator.artifacts import Artifacts
from coordinator.credentials import SiloIdentity
from coordinator.fair_share import FairShare
from coordinator.modes import Modes
from coordinator.offload import Offload
from coordinator.publisher import Publisher
from coordinator.store.database import Database
from coordinator.store.models import Checkpoint, Job, Round, Silo, Update
from coordinator.store.views import get_job_row, manifest_of
from fedmeki_core.errors import NotFoundError
from fedmeki_core.records import CheckpointInfo, JobState, RelayAction, RelayStep, RoundKind, RoundState, RoundTask
from fedmeki_core.stored_spec import read_stored_spec


class Dispatcher:
    def __init__(
        self,
        database: Database,
        artifacts: Artifacts,
        publisher: Publisher,
        offload: Offload,
        modes: Modes,
        max_poll_seconds: float,
        wake: threading.Event,
        stop: threading.Event,
        clock: Callable[[], datetime],
    ) -> None:
        self._db = database
        self._artifacts = artifacts
        self._publisher = publisher
        self._offload = offload
        self._modes = modes
        self._max_poll_seconds = max_poll_seconds
        self._wake = wake
        self._stop = stop
        self._now = clock
        # (job, round, silo) of cyclic rounds whose silo was told to wait for its turn: NextTask hands it other
        # work meanwhile, and the round again once its turn comes. In memory: after a restart the silo asks again.
        self._waiting_in_ring: set[tuple[str, int, str]] = set()
        self._ring_lock = threading.Lock()
        self._fair = FairShare()  # which of a silo's jobs comes next: round robin, never oldest-first only

    @property
    def waiting(self) -> int:
        """Long polls waiting for work now (each a future on the event loop)."""
        return self._publisher.waiting

    async def next_task(
        self, silo: SiloIdentity, tasks: Sequence[str], device: str, wait_seconds: float
    ) -> RoundTask | None:
        """Long poll: the silo's next task, waiting up to `wait_seconds` for one to appear. No lock and no thread is
        held while it waits; each look at the database runs on the blocking pool (`run_herd`: every waiter looks
        again after a change). Cancelled (the silo went away), it leaves nothing behind."""
        await self._offload.run_herd(self._touch_silo, silo, tasks, device)
        give_up = time.monotonic() + max(0.0, min(wait_seconds, self._max_poll_seconds))
        while True:
            seen = self._publisher.generation
            task = await self._offload.run_herd(self._find_task, silo)
            remaining = give_up - time.monotonic()
            if task is not None or remaining <= 0 or self._stop.is_set():
                return task
            await self._publisher.wait_for_change(seen, remaining)

    def relay_turn(self, silo: SiloIdentity, job_id: str, round_number: int) -> RelayStep:
        """What a silo does next in a cyclic secure-aggregation round's ring."""
        with self._db.read() as session:
            _, ring_round = self._modes.relay_round(session, silo, job_id, round_number, None)
            assert ring_round is not None
            turn = cyclic.relay_turn(session, ring_round, silo.id)
        with self._ring_lock:
            key = (job_id, round_number, silo.id)
            if turn.action == RelayAction.WAIT:
                self._waiting_in_ring.add(key)
            else:
                self._waiting_in_ring.discard(key)
        source = turn.source
        return RelayStep(
            turn.action,
            turn.hop,
            turn.position,
            turn.silos,
            None if source is None else CheckpointInfo(job_id, round_number, source.size_bytes, source.sha256),
        )

    def relay_source(self, silo: SiloIdentity, job_id: str, round_number: int, hop: int) -> tuple[CheckpointInfo, Path]:
        """The running sum after `hop`, for the silo whose turn it is to add to it or unmask it."""
        with self._db.read() as session:
            _, ring_round = self._modes.relay_round(session, silo, job_id, round_number, hop)
            assert ring_round is not None
            row = cyclic.require_download_turn(session, ring_round, silo.id, silo.name, hop)
            return CheckpointInfo(job_id, round_number, row.size_bytes, row.sha256), self._artifacts.absolute(row.path)

    def _touch_silo(self, silo: SiloIdentity, tasks: Sequence[str], device: str) -> None:
        with self._db.transaction() as session:
            row = session.get(Silo, silo.id)
            if row is None:
                raise NotFoundError(f"no silo {silo.name!r}")
            row.tasks = sorted(set(tasks))
            row.device = device[:100]
            row.last_seen_at = self._now()
        self._wake.set()

    def _find_task(self, silo: SiloIdentity) -> RoundTask | None:
        if silo.role == "injector":
            return self._find_injection()
        if silo.role == evaluations.ROLE:
            return self._find_evaluation(silo)
        with self._db.read() as session:
            rows = session.execute(
                select(Round, Job)
                .join(Job, Job.id == Round.job_id)
                .where(Round.state == RoundState.TRAINING.value, Job.state == JobState.RUNNING.value)
            ).all()
            mine = [
                ((job.created_at, job.id), (round_row, job)) for round_row, job in rows if silo.id in round_row.selected
            ]
            for round_row, job in self._fair.order(silo.id, mine):
                done = session.scalars(
                    select(Update.id).where(
                        Update.job_id == job.id,
                        Update.round_number == round_row.number,
                        Update.silo_id == silo.id,
                    )
                ).first()
                spec = read_stored_spec(job.spec)
                # A cyclic round's initiator still has the unmasking to do after its first hop.
                if done is not None and not self._modes.of(job.id, spec).may_read_ring(round_row, silo.id):
                    continue
                key = (job.id, round_row.number, silo.id)
                with self._ring_lock:
                    waiting = key in self._waiting_in_ring
                if waiting:
                    if cyclic.relay_turn(session, round_row, silo.id).action == RelayAction.WAIT:
                        continue  # not its turn yet: other work first
                    with self._ring_lock:
                        self._waiting_in_ring.discard(key)
                checkpoint_round = job.current_round
                checkpoint = session.get(Checkpoint, (job.id, checkpoint_round))
                assert checkpoint is not None
                self._fair.handed(silo.id, (job.created_at, job.id))
                return RoundTask(
                    job_id=job.id,
                    round=round_row.number,
                    kind=RoundKind(round_row.kind),
                    spec=spec,
                    checkpoint=CheckpointInfo(job.id, checkpoint_round, checkpoint.size_bytes, checkpoint.sha256),
                    manifest=manifest_of(job),
                    deadline_seconds=max(0.0, (round_row.deadline_at - self._now()).total_seconds()),
                )
        return None

    def _find_injection(self) -> RoundTask | None:
        with self._db.read() as session:
            row = injections.next_injection(session)
            if row is None:
                return None
            job = get_job_row(session, row.job_id)
            checkpoint = session.get(Checkpoint, (job.id, row.round_number))
            assert checkpoint is not None  # kept while its injection is pending
            return RoundTask(
                job_id=job.id,
                round=row.round_number,
                kind=RoundKind.INJECT,
                spec=read_stored_spec(job.spec),
                checkpoint=CheckpointInfo(job.id, row.round_number, checkpoint.size_bytes, checkpoint.sha256),
                manifest=manifest_of(job),
                deadline_seconds=max(0.0, (row.deadline_at - self._now()).total_seconds()),
            )

    def _find_evaluation(self, silo: SiloIdentity) -> RoundTask | None:
        """The evaluator's next checkpoint to score, as an evaluation round of that number."""
        with self._db.read() as session:
            row = evaluations.next_evaluation(session, silo, self._now())
            if row is None:
                return None
            job = get_job_row(session, row.job_id)
            checkpoint = session.get(Checkpoint, (job.id, row.round_number))
            assert checkpoint is not None  # kept while its score is pending
            return RoundTask(
                job_id=job.id,
                round=row.round_number,
                kind=RoundKind.EVALUATE,
                spec=read_stored_spec(job.spec),
                checkpoint=CheckpointInfo(job.id, row.round_number, checkpoint.size_bytes, checkpoint.sha256),
                manifest=manifest_of(job),
                deadline_seconds=max(0.0, (row.deadline_at - self._now()).total_seconds()),
            )
