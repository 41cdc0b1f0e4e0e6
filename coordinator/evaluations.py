"""The evaluator silo's scores: one record per committed training round of a job with `evaluation`, pending until
the evaluator reports its metrics on that round's checkpoint (fedmeki_core/jobspec_evaluation.py).

The rounds never wait for it. A pending score keeps its checkpoint from the retention until its deadline; past it
(the evaluator was away) it is shown as missed and the checkpoint goes. The evaluator is handed its checkpoints in
round order while the job runs and after it completes, until each one's deadline; a failed or cancelled job's
pending scores are missed. Scores go to this table only: the evaluator never appears among a round's silos.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.credentials import SiloIdentity
from coordinator.store.models import EVALUATION_DONE as DONE
from coordinator.store.models import EVALUATION_PENDING as PENDING
from coordinator.store.models import Evaluation, Job, Silo
from coordinator.store.views import SCORED_JOB_STATES, require_job_id
from fedmeki_core.errors import AlreadyExistsError, InvalidJobSpecError, PreconditionError
from fedmeki_core.jobspec import JobSpec

ROLE = "evaluator"


def check_evaluator(session: Session, spec: JobSpec) -> None:
    """At submission: the job's evaluator is a registered silo with the evaluator role."""
    if spec.evaluation is None:
        return
    name = spec.evaluation.evaluator
    silo = session.scalars(select(Silo).where(Silo.name == name)).first()
    if silo is None:
        raise InvalidJobSpecError("evaluation", f"no silo named {name!r}")
    if silo.role != ROLE:
        raise InvalidJobSpecError(
            "evaluation",
            f"silo {name!r} is a {silo.role}; an evaluator is registered as one "
            f"(fedmeki-coordinator silo add NAME --role {ROLE}) and never trains",
        )


def open_evaluation(session: Session, job_id: str, round_number: int, spec: JobSpec, now: datetime) -> None:
    """Queue the evaluator's score of the checkpoint a training round committed (no-op without an evaluator)."""
    if spec.evaluation is None:
        return
    silo_id = session.scalars(select(Silo.id).where(Silo.name == spec.evaluation.evaluator)).first()
    if silo_id is None:  # checked at submission; a silo is never deleted
        return
    session.add(
        Evaluation(
            job_id=job_id,
            round_number=round_number,
            silo_id=silo_id,
            state=PENDING,
            metrics={},
            created_at=now,
            deadline_at=now + spec.evaluation.deadline,
        )
    )


def next_evaluation(session: Session, silo: SiloIdentity, now: datetime) -> Evaluation | None:
    """The evaluator's lowest pending score, of its oldest job, before its deadline."""
    return session.scalars(
        select(Evaluation)
        .join(Job, Job.id == Evaluation.job_id)
        .where(
            Evaluation.silo_id == silo.id,
            Evaluation.state == PENDING,
            Evaluation.deadline_at > now,
            Job.state.in_(SCORED_JOB_STATES),
        )
        .order_by(Job.created_at, Evaluation.round_number)
        .limit(1)
    ).first()


def record_evaluation(
    session: Session,
    silo: SiloIdentity,
    job_id: str,
    round_number: int,
    num_samples: int,
    metrics: dict[str, float],
    now: datetime,
) -> None:
    """Store the evaluator's score of a checkpoint; only its own pending score, before the deadline, takes it."""
    require_job_id(job_id)
    row = session.get(Evaluation, (job_id, round_number))
    if row is None or row.silo_id != silo.id:
        raise PreconditionError(f"silo {silo.name!r} has no score of checkpoint {round_number} of job {job_id!r} due")
    if row.state == DONE:
        raise AlreadyExistsError(f"the score of checkpoint {round_number} of job {job_id} is already reported")
    job = session.get(Job, job_id)
    if row.deadline_at <= now or job is None or job.state not in SCORED_JOB_STATES:
        raise PreconditionError(f"the score of checkpoint {round_number} of job {job_id} is closed (missed)")
    row.state, row.num_samples, row.metrics, row.finished_at = DONE, num_samples, metrics, now


def decline_evaluation(session: Session, silo: SiloIdentity, job_id: str, round_number: int, now: datetime) -> bool:
    """The evaluator cannot score a checkpoint (no data for the task, a model it cannot load): the score is missed
    at once instead of being offered again until its deadline. False when it has no such pending score."""
    row = session.get(Evaluation, (job_id, round_number)) if silo.role == ROLE else None
    if row is None or row.silo_id != silo.id or row.state != PENDING:
        return False
    row.deadline_at = min(row.deadline_at, now)
    return True


def waiting_rounds(session: Session, job_id: str, now: datetime) -> set[int]:
    """The checkpoints the evaluator may still ask for: the retention keeps them."""
    return set(
        session.scalars(
            select(Evaluation.round_number).where(
                Evaluation.job_id == job_id, Evaluation.state == PENDING, Evaluation.deadline_at > now
            )
        )
    )


def evaluator_may_read(session: Session, silo: SiloIdentity, job_id: str, round_number: int) -> bool:
    """An evaluator reads exactly the checkpoints it is to score."""
    row = session.get(Evaluation, (job_id, round_number)) if silo.role == ROLE else None
    return row is not None and row.silo_id == silo.id
