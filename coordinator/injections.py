"""The injection stage's records: one per checkpoint of a job with `injection`, pending until the injector reports.

The injector works through a job's pending injections in checkpoint order (each continues the adapters of the
one before), while the silos already train the next round: the stage never holds the federated rounds up. A job
completes once its final evaluation and all of its injections are in; an injection past its deadline fails it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.credentials import SiloIdentity
from coordinator.round_table import Event, Facts, InjectionState, allowed, decide
from coordinator.store.models import Injection, Job
from coordinator.store.views import require_job_id
from fedmeki_core.errors import AlreadyExistsError, PreconditionError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.records import JobState

PENDING = InjectionState.PENDING.value


def open_injection(session: Session, job_id: str, round_number: int, spec: JobSpec, now: datetime) -> None:
    """Queue the injection of checkpoint `round_number` (a no-op for jobs without an injection stage)."""
    if spec.injection is None or spec.injection.federated:
        return
    deadline = now + spec.injection.deadline
    session.add(
        Injection(
            job_id=job_id, round_number=round_number, state=PENDING, metrics={}, created_at=now, deadline_at=deadline
        )
    )


def next_injection(session: Session) -> Injection | None:
    """The lowest pending injection of the oldest running job that has one."""
    return session.scalars(
        select(Injection)
        .join(Job, Job.id == Injection.job_id)
        .where(Injection.state == PENDING, Job.state == JobState.RUNNING.value)
        .order_by(Job.created_at, Injection.round_number)
        .limit(1)
    ).first()


def record_injection(
    session: Session, silo: SiloIdentity, job_id: str, round_number: int, metrics: dict[str, float], now: datetime
) -> None:
    """Store the injector's scores for a checkpoint; only the next pending injection of a running job takes them."""
    require_job_id(job_id)
    row = session.get(Injection, (job_id, round_number))
    if row is None:
        raise PreconditionError(f"job {job_id!r} has no injection of checkpoint {round_number}")
    state = InjectionState(row.state)
    if state is InjectionState.DONE:
        raise AlreadyExistsError(f"the injection of checkpoint {round_number} of job {job_id} is already reported")
    job = session.get(Job, job_id)
    if not allowed(state, Event.REPORTED) or job is None or job.state != JobState.RUNNING.value:
        raise PreconditionError(f"the injection of checkpoint {round_number} of job {job_id} is closed ({row.state})")
    earlier = session.scalars(
        select(Injection.round_number).where(
            Injection.job_id == job_id, Injection.state == PENDING, Injection.round_number < round_number
        )
    ).first()
    rule = decide(state, Event.REPORTED, Facts(earlier_injection_pending=earlier is not None))
    if rule is None:
        raise PreconditionError(
            f"checkpoint {earlier} of job {job_id} must be injected before checkpoint {round_number}"
        )
    row.state, row.silo_id, row.metrics, row.finished_at = rule.target.value, silo.id, metrics, now


def pending_rounds(session: Session, job_id: str) -> set[int]:
    return set(
        session.scalars(select(Injection.round_number).where(Injection.job_id == job_id, Injection.state == PENDING))
    )


def overdue_injection(session: Session, job_id: str, now: datetime) -> Injection | None:
    return session.scalars(
        select(Injection)
        .where(Injection.job_id == job_id, Injection.state == PENDING, Injection.deadline_at <= now)
        .order_by(Injection.round_number)
        .limit(1)
    ).first()


def fail_pending(session: Session, job_id: str, now: datetime) -> None:
    """A job that ends early takes its queued injections with it."""
    for row in session.scalars(select(Injection).where(Injection.job_id == job_id, Injection.state == PENDING)):
        rule = decide(InjectionState.PENDING, Event.FAIL)
        assert rule is not None
        row.state, row.finished_at = rule.target.value, now


def injector_may_read(session: Session, silo: SiloIdentity, job_id: str, round_number: int) -> bool:
    """An injector reads exactly the checkpoints queued for injection."""
    return silo.role == "injector" and session.get(Injection, (job_id, round_number)) is not None
