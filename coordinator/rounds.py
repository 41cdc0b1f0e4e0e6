"""Queries and small rules over job, round and update rows that the scheduler's parts share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SiloRound:
    """A round's state, its job's, and the silo's report in it (`report`: size, sha256, samples, path; None when it
    sent none), read together (`silo_round`)."""

    selected: list[str]
    kind: str
    state: str
    job_state: str
    report: tuple[int, str, int, str] | None

    def is_report(self, size: int, sha256: str, num_samples: int, with_file: bool = False) -> bool:
        """Whether the silo's report in the round is this one (same size, digest and sample count; `with_file`: and
        an update's, not an evaluation report's)."""
        return (
            self.report is not None
            and self.report[:3] == (size, sha256, num_samples)
            and (not with_file or self.report[3] != "")
        )


def silo_round(session: Session, silo: SiloIdentity, job_id: str, round_number: int) -> SiloRound | None:
    """One read of the round, its job and the silo's report in it (None: no such round). A round holds at most one
    report per silo, except a cyclic round's hops (read those with `same_update`)."""
    if not is_job_id(job_id):
        return None
    found = session.execute(
        select(
            Round.selected,
            Round.kind,
            Round.state,
            Job.state,
            Update.size_bytes,
            Update.sha256,
            Update.num_samples,
            Update.path,
        )
        .join(Job, Job.id == Round.job_id)
        .outerjoin(
            Update,
            (Update.job_id == Round.job_id) & (Update.round_number == Round.number) & (Update.silo_id == silo.id),
        )
        .where(Round.job_id == job_id, Round.number == round_number)
    ).first()
    if found is None:
        return None
    selected, kind, state, job_state, size, sha256, samples, path = found
    report = None if size is None else (size, sha256, samples, path)
    return SiloRound(list(selected), kind, state, job_state, report)


def round_for_silo(session: Session, silo: SiloIdentity, job_id: str, round_number: int, kind: RoundKind) -> list[str]:
    """The round's selected silos, if it takes this silo's report of `kind` now; raises otherwise. One read of the
    round's state and its job's: an upload's check, made for each of hundreds of silos a round, reads neither row
    whole (a job's spec and manifest are JSON to decode)."""
    return takes_report(silo_round(session, silo, job_id, round_number), silo, job_id, round_number, kind)


def takes_report(
    found: SiloRound | None, silo: SiloIdentity, job_id: str, round_number: int, kind: RoundKind
) -> list[str]:
    """`round_for_silo`'s checks on a round already read."""
    if found is None or silo.id not in found.selected:
        raise PreconditionError(f"silo {silo.name!r} is not selected for round {round_number} of job {job_id!r}")
    # Before the state checks: a silo retrying an accepted upload learns it is done, even after the round closed.
    if found.report is not None:
        raise AlreadyExistsError(f"silo {silo.name!r} already reported for round {round_number} of job {job_id}")
    if found.job_state != JobState.RUNNING.value:
        raise PreconditionError(f"job {job_id} is {found.job_state}")
    if found.kind != kind.value:
        raise PreconditionError(f"round {round_number} of job {job_id} is a {found.kind} round")
    if found.state != RoundState.TRAINING.value:
        raise PreconditionError(f"round {round_number} of job {job_id} is closed ({found.state})")
    return found.selected
