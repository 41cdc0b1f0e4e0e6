"""The tick loop's step for one job: load the facts, ask the transition table, apply the effects in one
transaction; a round that reaches `aggregating` is committed (`Commit`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from coordinator import cyclic, injections, round_table
from coordinator.commit import Commit
from coordinator.effects import Effects, fire
from coordinator.eligibility import Eligibility
from coordinator.metrics import CoordinatorMetrics
from coordinator.modes import Modes
from coordinator.publisher import Publisher
from coordinator.round_table import Effect, Event, Facts, Reason
from coordinator.rounds import current_round
from coordinator.store.database import Database
from coordinator.store.models import Job, Round, Silo, Update
from coordinator.store.views import get_job_row
from fedmeki_core.faults import crash_point
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.records import JobState, RoundKind, RoundState
from fedmeki_core.stored_spec import read_stored_spec

logger = logging.getLogger(__name__)

_READ_UPDATES = frozenset({Effect.RECORD_METRICS, Effect.NOTE_NO_EVALUATION})  # the effects that use the update rows


@dataclass(frozen=True)
class _Loaded:
    """The facts of a running job's tick, with what its effects and reasons need (the round's update rows are
    read only when a row fires: a tick after each accepted upload counts them, so a round is not O(N^2) rows)."""

    facts: Facts
    eligible: list[str]
    uncovered: list[str]
    overdue: int | None  # the checkpoint whose injection is overdue


class RoundDriver:
    def __init__(
        self,
        database: Database,
        effects: Effects,
        modes: Modes,
        commit: Commit,
        publisher: Publisher,
        metrics: CoordinatorMetrics,
        eligibility: Eligibility,
        lock: threading.RLock,
        stop: threading.Event,
        clock: Callable[[], datetime],
    ) -> None:
        self._db = database
        self._effects = effects
        self._modes = modes
        self._commit = commit
        self._publisher = publisher
        self._metrics = metrics
        self._eligibility = eligibility
        # Each waiting round's eligible silos as last published: a change is published, so a watcher sees it.
        self._waiting: dict[str, tuple[str, ...]] = {}
        self._lock = lock
        self._stop = stop
        self._now = clock

    def advance(self, job_id: str) -> None:
        while not self._stop.is_set():
            with self._lock, self._db.transaction() as session:
                job = get_job_row(session, job_id)
                if JobState(job.state).finished:
                    self._waiting.pop(job_id, None)
                    return
                spec = read_stored_spec(job.spec)
                now = self._now()
                if job.state == JobState.PENDING.value:
                    rule = fire(job, Event.TICK, now)
                    assert rule is not None
                    self._effects.apply(session, job, None, rule, now, spec)
                    round_row = current_round(session, job)
                    changed = True
                else:
                    round_row = current_round(session, job)
                    changed = self._tick(session, job, spec, round_row, now)
                number, round_state = round_row.number, RoundState(round_row.state)
            if changed:
                if round_state == RoundState.TRAINING:
                    crash_point("coordinator.round_opened")
                self._publisher.job_changed(job_id, number)
            if round_state == RoundState.AGGREGATING:
                with self._metrics.aggregation_seconds.time():
                    self._commit.aggregate(job_id)
            elif not changed:
                return

    def _tick(self, session: Session, job: Job, spec: JobSpec, round_row: Round, now: datetime) -> bool:
        """Load the facts of a running job, ask the table (the job's rows, then its round's) and apply the effects."""
        loaded = self._load(session, job, spec, round_row, now)
        target: Job | Round = job
        rule = fire(job, Event.TICK, now, loaded.facts)
        if rule is None and round_table.allowed(RoundState(round_row.state), Event.TICK):
            target, rule = round_row, fire(round_row, Event.TICK, now, loaded.facts)
        if rule is None:
            return self._eligible_changed(job.id, loaded.eligible) if round_row.state == RoundState.OPEN else False
        self._waiting.pop(job.id, None)
        if isinstance(target, Round) and rule.target == RoundState.TRAINING:
            logger.info("job %s: round %d selected %d silos", job.id, round_row.number, len(loaded.eligible))
        if rule.target == JobState.COMPLETED:
            logger.info("job %s completed", job.id)
        reason = "" if rule.reason is None else self._word(session, rule.reason, spec, round_row, loaded)
        updates = _round_updates(session, round_row) if _READ_UPDATES.intersection(rule.effects) else ()
        self._effects.apply(session, job, round_row, rule, now, spec, updates, reason, loaded.eligible)
        return True

    def _eligible_changed(self, job_id: str, eligible: list[str]) -> bool:
        """Whether a waiting round's eligible silos changed since the last look (the first look sets them)."""
        before = self._waiting.get(job_id)
        self._waiting[job_id] = now = tuple(eligible)
        return before is not None and before != now

    def _load(self, session: Session, job: Job, spec: JobSpec, round_row: Round, now: datetime) -> _Loaded:
        state = RoundState(round_row.state)
        overdue = injections.overdue_injection(session, job.id, now)
        final = round_row.kind == RoundKind.EVALUATE.value and state == RoundState.COMMITTED
        eligible, uncovered = self._eligible_silos(session, spec, now) if state == RoundState.OPEN else ([], [])
        updates = revoked = 0
        if state == RoundState.TRAINING:
            updates, revoked = _reports(session, round_row)
        facts = Facts(
            kind=RoundKind(round_row.kind),
            cyclic=self._modes.of(job.id, spec).ring,
            eligible=len(eligible),
            uncovered=len(uncovered),
            min_silos=spec.min_silos,
            selected=len(round_row.selected),
            updates=updates,
            revoked=revoked,
            deadline_passed=now >= round_row.deadline_at,
            final_committed=final,
            injections_pending=len(injections.pending_rounds(session, job.id)) if final else 0,
            injection_overdue=overdue is not None,
        )
        return _Loaded(facts, eligible, uncovered, None if overdue is None else overdue.round_number)

    def _word(self, session: Session, reason: Reason, spec: JobSpec, round_row: Round, loaded: _Loaded) -> str:
        """The human reason a row fails a job for, in the words of what was loaded."""
        number, eligible, uncovered = round_row.number, len(loaded.eligible), loaded.uncovered
        match reason:
            case Reason.NO_ELIGIBLE_SILOS:
                return (
                    f"round {number}: no eligible silo holds data for {', '.join(uncovered)} "
                    f"({eligible} eligible, min_silos {spec.min_silos})"
                    if uncovered
                    else f"round {number}: only {eligible} eligible silos (min_silos "
                    f"{spec.min_silos}) polled before the deadline"
                )
            case Reason.TOO_FEW_UPDATES:
                return (
                    f"round {number}: {loaded.facts.updates} updates before the deadline, min_silos is {spec.min_silos}"
                )
            case Reason.RING_STALLED:
                return cyclic.stalled_reason(session, round_row)
            case Reason.INJECTION_OVERDUE:
                return (
                    f"the injection of checkpoint {loaded.overdue} was not reported before its deadline "
                    "(is the injector silo running, with data for every task of the suite? its log says)"
                )

    def _eligible_silos(self, session: Session, spec: JobSpec, now: datetime) -> tuple[list[str], list[str]]:
        silos, uncovered = self._eligibility.silos(session, spec, now)
        return sorted(silo.id for silo in silos), uncovered


def _reports(session: Session, round_row: Round) -> tuple[int, int]:
    """The round's recorded reports, counted, and its selected silos revoked since the selection without one (not
    waited for: their updates will never come). Revoked silos are few, so they are read, not the round's reports."""
    in_round = _in_round(round_row)
    count = session.scalar(select(func.count()).select_from(Update).where(*in_round)) or 0
    revoked = set(session.scalars(select(Silo.id).where(Silo.revoked))) & set(round_row.selected)
    if revoked:
        revoked -= set(session.scalars(select(Update.silo_id).where(*in_round, Update.silo_id.in_(revoked))))
    return count, len(revoked)


def _round_updates(session: Session, round_row: Round) -> Sequence[Update]:
    """The round's update rows, for the effects of the row that closes it (its metrics, whether any came)."""
    return session.scalars(select(Update).where(*_in_round(round_row))).all()


def _in_round(round_row: Round) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    return Update.job_id == round_row.job_id, Update.round_number == round_row.number
