"""Queries and small rules over job, round and update rows that the scheduler's parts share."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.credentials import SiloIdentity
from coordinator.store.models import Job, Round, Update
from coordinator.store.views import is_job_id
from fedmeki_core.algorithms import ServerAlgorithm, get_algorithm
from fedmeki_core.errors import AlreadyExistsError, PreconditionError
from fedmeki_core.jobspec import DifferentialPrivacySpec, JobSpec
from fedmeki_core.records import JobState, RoundKind, RoundState


def central_dp(spec: JobSpec) -> DifferentialPrivacySpec | None:
    dp = spec.privacy.dp
    return dp if dp is not None and dp.mode == "central" else None


def server_half(spec: JobSpec) -> ServerAlgorithm:
    entry = get_algorithm(spec.algorithm.name)
    return entry.server(entry.resolve_options(spec.algorithm.options))


def same_update(
    session: Session, silo: SiloIdentity, job_id: str, round_number: int, size: int, sha256: str, num_samples: int
) -> Update | None:
    """The silo's accepted update for the round if it is this one (same size, digest and sample count)."""
    if not is_job_id(job_id):
        return None
    return session.scalars(
        select(Update).where(
            Update.job_id == job_id,
            Update.round_number == round_number,
            Update.silo_id == silo.id,
            Update.size_bytes == size,
            Update.sha256 == sha256,
            Update.num_samples == num_samples,
            Update.path != "",  # a training round's update, not an evaluation report
        )
    ).first()


def weighted_mean(updates: Sequence[Update]) -> dict[str, float]:
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for update in updates:
        for key, value in update.metrics.items():
            totals[key] = totals.get(key, 0.0) + value * update.num_samples
            weights[key] = weights.get(key, 0.0) + update.num_samples
    return {key: totals[key] / weights[key] for key in totals if weights[key] > 0}


def latest_round(session: Session, job: Job) -> Round | None:
    return session.scalars(select(Round).where(Round.job_id == job.id).order_by(Round.number.desc()).limit(1)).first()


def current_round(session: Session, job: Job) -> Round:
    round_row = latest_round(session, job)
    assert round_row is not None, f"running job {job.id} has no round"
    return round_row


def round_for_silo(session: Session, silo: SiloIdentity, job_id: str, round_number: int, kind: RoundKind) -> list[str]:
    """The round's selected silos, if it takes this silo's report of `kind` now; raises otherwise. One read of the
    round's state and its job's: an upload's check, made twice for each of hundreds of silos a round, reads neither
    row whole (a job's spec and manifest are JSON to decode)."""
    reported = select(Update.id).where(
        Update.job_id == job_id, Update.round_number == round_number, Update.silo_id == silo.id
    )
    found = (
        session.execute(
            select(Round.selected, Round.kind, Round.state, Job.state, reported.exists())
            .join(Job, Job.id == Round.job_id)
            .where(Round.job_id == job_id, Round.number == round_number)
        ).first()
        if is_job_id(job_id)
        else None
    )
    if found is None or silo.id not in found[0]:
        raise PreconditionError(f"silo {silo.name!r} is not selected for round {round_number} of job {job_id!r}")
    selected, round_kind, round_state, job_state, duplicate = found
    # Before the state checks: a silo retrying an accepted upload learns it is done, even after the round closed.
    if duplicate:
        raise AlreadyExistsError(f"silo {silo.name!r} already reported for round {round_number} of job {job_id}")
    if job_state != JobState.RUNNING.value:
        raise PreconditionError(f"job {job_id} is {job_state}")
    if round_kind != kind.value:
        raise PreconditionError(f"round {round_number} of job {job_id} is a {round_kind} round")
    if round_state != RoundState.TRAINING.value:
        raise PreconditionError(f"round {round_number} of job {job_id} is closed ({round_state})")
    return list(selected)
