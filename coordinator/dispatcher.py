"""Hands silos their work: the long poll (NextTask), which waits without a lock or a thread, and the cyclic ring's
turns."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator import cyclic, evaluations, injections
from coordinator.artifacts import Artifacts
from coordinator.coalescer import Coalescer
from coordinator.credentials import SiloIdentity
from coordinator.fair_share import FairShare
from coordinator.modes import Modes
from coordinator.offload import Offload
from coordinator.publisher import Publisher
from coordinator.store.database import Database
from coordinator.store.models import Checkpoint, Job, Round, Silo, Update
from coordinator.store.views import get_job_row, manifest_of
from fedmeki_core.errors import NotFoundError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.records import CheckpointInfo, JobState, RelayAction, RelayStep, RoundKind, RoundState, RoundTask
from fedmeki_core.stored_spec import read_stored_spec
from fedmeki_core.wire import TensorSpec


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
        self._touches = Coalescer(offload, self._touch_silos)
        self._looks = Coalescer(offload, self._find_tasks)

    @property
    def waiting(self) -> int:
        """Long polls waiting for work now (each a future on the event loop)."""
        return self._publisher.waiting

    async def next_task(
        self, silo: SiloIdentity, tasks: Sequence[str], device: str, wait_seconds: float
    ) -> RoundTask | None:
        """Long poll: the silo's next task, waiting up to `wait_seconds` for one to appear. No lock and no thread is
        held while it waits; its looks at the database are batched with the other polls' (`Coalescer`: after a
        change every waiter looks again, in one query for all). Cancelled (the silo went away), it leaves nothing
        behind."""
        await self._touches.ask(_Touch(silo, tuple(sorted(set(tasks))), device[:100]))
        give_up = time.monotonic() + max(0.0, min(wait_seconds, self._max_poll_seconds))
        while True:
            seen = self._publisher.generation
            task = await self._looks.ask(silo)
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

    def _touch_silos(self, touches: Sequence[_Touch]) -> list[Exception | None]:
        """Record that these silos polled (what they can run, their device, when), in one transaction."""
        results: list[Exception | None] = []
        with self._db.transaction() as session:
            rows = {
                row.id: row for row in session.scalars(select(Silo).where(Silo.id.in_({t.silo.id for t in touches})))
            }
            for touch in touches:
                row = rows.get(touch.silo.id)
                if row is None:
                    results.append(NotFoundError(f"no silo {touch.silo.name!r}"))
                    continue
                row.tasks = list(touch.tasks)
                row.device = touch.device
                row.last_seen_at = self._now()
                results.append(None)
        self._wake.set()
        return results

    def _find_tasks(self, silos: Sequence[SiloIdentity]) -> list[RoundTask | None]:
        """Each silo's next task, from one read of the open rounds and of the updates they hold."""
        trainers = [silo for silo in silos if silo.role not in ("injector", evaluations.ROLE)]
        found: dict[str, RoundTask | None] = {}
        if trainers:
            with self._db.read() as session:
                open_rounds = _OpenRounds.read(session, {silo.id for silo in trainers})
                for silo in trainers:
                    found[silo.id] = self._find_task(session, open_rounds, silo)
        return [self._find_other(silo) if silo.id not in found else found[silo.id] for silo in silos]

    def _find_other(self, silo: SiloIdentity) -> RoundTask | None:
        """The next task of a silo that does not train: the injector's injection, an evaluator's checkpoint."""
        return self._find_injection() if silo.role == "injector" else self._find_evaluation(silo)

    def _find_task(self, session: Session, open_rounds: _OpenRounds, silo: SiloIdentity) -> RoundTask | None:
        mine = [
            ((job.created_at, job.id), (round_row, job))
            for round_row, job in open_rounds.rows
            if silo.id in round_row.selected
        ]
        for round_row, job in self._fair.order(silo.id, mine):
            spec = open_rounds.spec(job)
            # A cyclic round's initiator still has the unmasking to do after its first hop.
            done = (job.id, round_row.number, silo.id) in open_rounds.updated
            if done and not self._modes.of(job.id, spec).may_read_ring(round_row, silo.id):
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
            checkpoint = session.get(Checkpoint, (job.id, checkpoint_round))  # the session's identity map: one read
            assert checkpoint is not None
            self._fair.handed(silo.id, (job.created_at, job.id))
            return RoundTask(
                job_id=job.id,
                round=round_row.number,
                kind=RoundKind(round_row.kind),
                spec=spec,
                checkpoint=CheckpointInfo(job.id, checkpoint_round, checkpoint.size_bytes, checkpoint.sha256),
                manifest=open_rounds.manifest(job),
                deadline_seconds=max(0.0, (round_row.deadline_at - self._now()).total_seconds()),
            )
        return None

    def _find_injection(self) -> RoundTask | None:
        with self._db.read() as session:
            row = injections.next_injection(session)
            if row is None:
                return None
            return self._checkpoint_task(session, row.job_id, row.round_number, RoundKind.INJECT, row.deadline_at)

    def _find_evaluation(self, silo: SiloIdentity) -> RoundTask | None:
        """The evaluator's next checkpoint to score, as an evaluation round of that number."""
        with self._db.read() as session:
            row = evaluations.next_evaluation(session, silo, self._now())
            if row is None:
                return None
            return self._checkpoint_task(session, row.job_id, row.round_number, RoundKind.EVALUATE, row.deadline_at)

    def _checkpoint_task(
        self, session: Session, job_id: str, number: int, kind: RoundKind, deadline_at: datetime
    ) -> RoundTask:
        """A task on a committed checkpoint (an injection, an evaluator's score), kept while the task is pending."""
        job = get_job_row(session, job_id)
        checkpoint = session.get(Checkpoint, (job.id, number))
        assert checkpoint is not None  # kept while its task is pending
        return RoundTask(
            job_id=job.id,
            round=number,
            kind=kind,
            spec=read_stored_spec(job.spec),
            checkpoint=CheckpointInfo(job.id, number, checkpoint.size_bytes, checkpoint.sha256),
            manifest=manifest_of(job),
            deadline_seconds=max(0.0, (deadline_at - self._now()).total_seconds()),
        )


@dataclass(frozen=True)
class _Touch:
    silo: SiloIdentity
    tasks: tuple[str, ...]
    device: str


@dataclass
class _OpenRounds:
    """The training rounds of running jobs, read once for a batch of polls, with the updates the polling silos
    hold in them; each job's spec and manifest parsed once."""

    rows: Sequence[tuple[Round, Job]]
    updated: set[tuple[str, int, str]]  # (job, round, silo) of the polling silos' updates in these rounds
    _specs: dict[str, JobSpec] = field(default_factory=dict)
    _manifests: dict[str, list[TensorSpec]] = field(default_factory=dict)

    @classmethod
    def read(cls, session: Session, silo_ids: set[str]) -> _OpenRounds:
        rows = session.execute(
            select(Round, Job)
            .join(Job, Job.id == Round.job_id)
            .where(Round.state == RoundState.TRAINING.value, Job.state == JobState.RUNNING.value)
        ).all()
        wanted = {(job.id, round_row.number) for round_row, job in rows if silo_ids & set(round_row.selected)}
        updated: set[tuple[str, int, str]] = set()
        if wanted:
            held = session.execute(
                select(Update.job_id, Update.round_number, Update.silo_id).where(
                    Update.job_id.in_({job_id for job_id, _ in wanted}), Update.silo_id.in_(silo_ids)
                )
            )
            updated = {(job_id, number, silo_id) for job_id, number, silo_id in held if (job_id, number) in wanted}
        return cls([(round_row, job) for round_row, job in rows], updated)

    def spec(self, job: Job) -> JobSpec:
        if job.id not in self._specs:
            self._specs[job.id] = read_stored_spec(job.spec)
        return self._specs[job.id]

    def manifest(self, job: Job) -> list[TensorSpec]:
        if job.id not in self._manifests:
            self._manifests[job.id] = manifest_of(job)
        return self._manifests[job.id]
