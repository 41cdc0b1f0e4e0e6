"""Read-only views: database rows turned into the domain values the APIs return."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from coordinator.round_table import InjectionState
from coordinator.store.models import (
    EVALUATION_DONE,
    EVALUATION_PENDING,
    Checkpoint,
    Evaluation,
    Injection,
    Job,
    Round,
    Silo,
    Update,
    utcnow,
)
from fedmeki_core.errors import InvalidInputError, NotFoundError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.records import CheckpointInfo, JobState, JobStatus, RoundKind, RoundState, RoundSummary, SiloResult
from fedmeki_core.stored_spec import read_stored_spec
from fedmeki_core.wire import TensorSpec


def manifest_of(job: Job) -> list[TensorSpec]:
    return tensor_specs(job.manifest)


def tensor_specs(manifest: list[dict[str, Any]]) -> list[TensorSpec]:
    """A manifest as a job row stores it (a JSON list of name, dtype, shape)."""
    return [TensorSpec(name=t["name"], dtype=t["dtype"], shape=tuple(t["shape"])) for t in manifest]


_JOB_ID = re.compile(r"[0-9a-f]{32}")  # what the scheduler gives jobs (uuid4 hex)


def is_job_id(value: str) -> bool:
    """Whether `value` can name a job. One that cannot is never queried: PostgreSQL refuses NUL bytes in it."""
    return _JOB_ID.fullmatch(value) is not None


def require_job_id(value: str) -> None:
    """InvalidInputError unless `value` can name a job."""
    if not is_job_id(value):
        raise InvalidInputError(f"{value[:100]!r} is not a job id (32 hex digits)")


def find_job_row(session: Session, job_id: str) -> Job | None:
    """The job, or None (an id that is not one is not queried)."""
    return session.get(Job, job_id) if is_job_id(job_id) else None


def get_job_row(session: Session, job_id: str) -> Job:
    job = find_job_row(session, job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id!r}")
    return job


def silo_names(session: Session, silo_ids: Iterable[str]) -> dict[str, str]:
    ids = list(silo_ids)
    if not ids:
        return {}
    return {silo.id: silo.name for silo in session.scalars(select(Silo).where(Silo.id.in_(ids)))}


def latest_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    return session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.round_number.desc()).limit(1)
    ).first()


def get_checkpoint_row(session: Session, job_id: str, round_number: int) -> Checkpoint:
    """Checkpoint `round_number` of the job, or its latest when `round_number` is negative. Every silo downloads
    one each round: the job's row (its spec and manifest, JSON to decode) is read only to say what is missing."""
    row = None
    if is_job_id(job_id):
        key = (job_id, round_number)
        row = latest_checkpoint(session, job_id) if round_number < 0 else session.get(Checkpoint, key)
    if row is None:
        get_job_row(session, job_id)  # no such job: says so
        raise NotFoundError(f"job {job_id!r} has no checkpoint {round_number}")
    return row


def checkpoint_info(row: Checkpoint) -> CheckpointInfo:
    return CheckpointInfo(job_id=row.job_id, round=row.round_number, size_bytes=row.size_bytes, sha256=row.sha256)


# What one update's or round's metrics show at most, whatever a row holds: a silo flooding metric names must not
# make GetJob and ListJobs answers too big to send. Uploads past the same bounds are refused at the door
# (coordinator/receiving.py), so nothing accepted is hidden; rows stored before that bound are cut here.
MAX_METRICS_SHOWN = 256  # a suite's personalised evaluation sends well over 64
MAX_METRIC_NAME = 128  # characters


def shown_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The first MAX_METRICS_SHOWN metrics by name, names cut to MAX_METRIC_NAME characters."""
    return {name[:MAX_METRIC_NAME]: metrics[name] for name in sorted(metrics)[:MAX_METRICS_SHOWN]}


def round_summary(session: Session, round_row: Round, names: dict[str, str] | None = None) -> RoundSummary:
    updates = session.execute(
        select(Update.silo_id, Update.num_samples, Update.metrics).where(
            Update.job_id == round_row.job_id, Update.round_number == round_row.number
        )
    ).all()
    names = names if names is not None else silo_names(session, [*round_row.selected, *(u.silo_id for u in updates)])
    results = sorted(
        (SiloResult(names.get(u.silo_id, u.silo_id), u.num_samples, shown_metrics(u.metrics)) for u in updates),
        key=lambda result: result.silo,
    )
    return RoundSummary(
        number=round_row.number,
        kind=RoundKind(round_row.kind),
        state=RoundState(round_row.state),
        selected_silos=tuple(sorted(names.get(s, s) for s in round_row.selected)),
        reported_silos=tuple(result.silo for result in results),
        metrics=shown_metrics(round_row.metrics),
        opened_at=round_row.opened_at,
        closed_at=round_row.closed_at,
        silo_results=tuple(results),
    )


_INJECTION_STATES: dict[str, RoundState] = {
    InjectionState.PENDING: RoundState.TRAINING,
    InjectionState.DONE: RoundState.COMMITTED,
    InjectionState.FAILED: RoundState.FAILED,
}


def injection_summaries(session: Session, job_id: str, names: dict[str, str]) -> tuple[RoundSummary, ...]:
    rows = session.scalars(select(Injection).where(Injection.job_id == job_id).order_by(Injection.round_number))
    return tuple(
        RoundSummary(
            number=row.round_number,
            kind=RoundKind.INJECT,
            state=_INJECTION_STATES[row.state],
            reported_silos=(names.get(row.silo_id, row.silo_id),) if row.silo_id else (),
            metrics=shown_metrics(row.metrics),
            opened_at=row.created_at,
            closed_at=row.finished_at,
        )
        for row in rows
    )


SCORED_JOB_STATES = (JobState.RUNNING.value, JobState.COMPLETED.value)  # whose checkpoints an evaluator scores


def evaluation_summaries(session: Session, job: Job, names: dict[str, str]) -> tuple[RoundSummary, ...]:
    """The evaluator's scores (coordinator/evaluations.py) by checkpoint round: committed with its metrics and
    sample count, training while pending, failed when missed (past its deadline, or the job failed or cancelled)."""
    now = utcnow()
    rows = session.scalars(select(Evaluation).where(Evaluation.job_id == job.id).order_by(Evaluation.round_number))
    summaries = []
    for row in rows:
        name = names.get(row.silo_id, row.silo_id)
        done = row.state == EVALUATION_DONE
        missed = row.state == EVALUATION_PENDING and (row.deadline_at <= now or job.state not in SCORED_JOB_STATES)
        metrics = shown_metrics(row.metrics)
        summaries.append(
            RoundSummary(
                number=row.round_number,
                kind=RoundKind.EVALUATE,
                state=RoundState.COMMITTED if done else RoundState.FAILED if missed else RoundState.TRAINING,
                selected_silos=(name,),
                reported_silos=(name,) if done else (),
                metrics=metrics,
                opened_at=row.created_at,
                closed_at=row.finished_at,
                silo_results=(SiloResult(name, row.num_samples, metrics),) if done else (),
            )
        )
    return tuple(summaries)


EligibleSilos = Callable[[Session, JobSpec], tuple[str, ...]]  # the names of the silos a job's round could select


def job_status(session: Session, job_id: str, eligible: EligibleSilos | None = None) -> JobStatus:
    """The job as stored; with `eligible`, a running job's open round also names the silos it could select now."""
    job = get_job_row(session, job_id)
    rounds = session.scalars(select(Round).where(Round.job_id == job_id).order_by(Round.number)).all()
    names = {silo.id: silo.name for silo in session.scalars(select(Silo))}
    checkpoint = latest_checkpoint(session, job_id)
    spec = read_stored_spec(job.spec)
    summaries = [round_summary(session, r, names) for r in rounds]
    if (
        eligible is not None
        and job.state == JobState.RUNNING.value
        and rounds
        and rounds[-1].state == RoundState.OPEN.value
    ):
        summaries[-1] = replace(summaries[-1], eligible_silos=eligible(session, spec))
    return JobStatus(
        id=job.id,
        spec=spec,
        state=JobState(job.state),
        reason=job.reason,
        current_round=job.current_round,
        rounds=tuple(summaries),
        created_at=job.created_at,
        updated_at=job.updated_at,
        latest_checkpoint=checkpoint_info(checkpoint) if checkpoint else None,
        injections=injection_summaries(session, job_id, names),
        evaluations=evaluation_summaries(session, job, names),
    )


def list_job_ids(session: Session, states: Iterable[JobState] = ()) -> list[str]:
    query = select(Job.id).order_by(Job.created_at)
    wanted = [s.value for s in states]
    if wanted:
        query = query.where(Job.state.in_(wanted))
    return list(session.scalars(query))


def list_job_keys(
    session: Session, states: Iterable[JobState], after: tuple[datetime, str] | None, limit: int
) -> list[tuple[datetime, str]]:
    """(created_at, id) of at most `limit` jobs in these states (all when none), oldest first, after `after`."""
    query = select(Job.created_at, Job.id).order_by(Job.created_at, Job.id).limit(limit)
    wanted = [s.value for s in states]
    if wanted:
        query = query.where(Job.state.in_(wanted))
    if after is not None:
        created, job_id = after
        query = query.where(or_(Job.created_at > created, and_(Job.created_at == created, Job.id > job_id)))
    return [(row.created_at, row.id) for row in session.execute(query)]
