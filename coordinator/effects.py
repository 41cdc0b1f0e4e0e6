"""Carries out the transition table's rows on job, round and injection rows, in the caller's transaction."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from coordinator import evaluations, injections, round_table
from coordinator.artifacts import Artifacts
from coordinator.modes import Modes
from coordinator.retention import Retention
from coordinator.round_table import Effect, Event, Facts, Rule
from coordinator.rounds import central_dp, weighted_mean
from coordinator.running_sums import RunningSums
from coordinator.store.models import Job, Round, Update
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.privacy.dp import gaussian_epsilon
from fedmeki_core.records import JobState, RoundKind, RoundState

logger = logging.getLogger(__name__)


def fire(row: Job | Round, event: Event, now: datetime, facts: Facts = round_table.NO_FACTS) -> Rule | None:
    """Ask the table what `event` does to a job or round row and move the row to the row's target (no effects)."""
    state: JobState | RoundState = JobState(row.state) if isinstance(row, Job) else RoundState(row.state)
    rule = round_table.decide(state, event, facts)
    if rule is None:
        return None
    row.state = rule.target.value
    if isinstance(row, Job):
        row.updated_at = now
    elif rule.target in (RoundState.COMMITTED, RoundState.FAILED):
        row.closed_at = now
    return rule


class Effects:
    def __init__(self, artifacts: Artifacts, sums: RunningSums, retention: Retention, modes: Modes) -> None:
        self._artifacts = artifacts
        self._sums = sums
        self._retention = retention
        self._modes = modes

    def apply(
        self,
        session: Session,
        job: Job,
        round_row: Round | None,
        rule: Rule,
        now: datetime,
        spec: JobSpec | None = None,
        updates: Sequence[Update] = (),
        reason: str = "",
        eligible: Sequence[str] = (),
    ) -> list[Path]:
        """Carry out a row's effects in the caller's transaction; returns checkpoint files to recycle after it."""
        expired: list[Path] = []
        if reason and isinstance(rule.target, JobState):
            job.reason = reason
        for effect in rule.effects:
            match effect:
                case Effect.OPEN_FIRST_ROUND:
                    assert spec is not None
                    self.open_round(session, job, spec, 1, RoundKind.TRAIN, now)
                case Effect.OPEN_NEXT_ROUND:
                    assert spec is not None and round_row is not None
                    kind = RoundKind.TRAIN if round_row.number < spec.rounds else RoundKind.EVALUATE
                    self.open_round(session, job, spec, round_row.number + 1, kind, now)
                case Effect.QUEUE_INJECTION:
                    assert spec is not None
                    injections.open_injection(session, job.id, job.current_round, spec, now)
                case Effect.QUEUE_EVALUATION:
                    assert spec is not None and round_row is not None
                    evaluations.open_evaluation(session, job.id, round_row.number, spec, now)
                case Effect.SELECT_SILOS:
                    assert spec is not None and round_row is not None
                    round_row.selected = list(eligible)
                    round_row.deadline_at = now + spec.round_deadline
                case Effect.RECORD_METRICS:
                    assert round_row is not None
                    round_row.metrics = weighted_mean(updates)
                    dp = None if spec is None or round_row.kind != RoundKind.TRAIN.value else central_dp(spec)
                    if dp is not None and dp.noise_multiplier > 0:  # the number-th release
                        epsilon = gaussian_epsilon(dp.noise_multiplier, round_row.number, dp.delta)
                        round_row.metrics = {**round_row.metrics, "dp_epsilon": epsilon}
                case Effect.NOTE_NO_EVALUATION:
                    if not updates:
                        job.reason = "no silo reported the final evaluation before the deadline"
                case Effect.EXPIRE_CHECKPOINTS:
                    assert spec is not None and round_row is not None
                    mode = self._modes.of(job.id, spec)
                    expired = mode.expire_checkpoints(self._retention, session, round_row.number)
                case Effect.COMPLETE_WHEN_INJECTED:
                    pending = len(injections.pending_rounds(session, job.id))
                    if fire(job, Event.TICK, now, Facts(final_committed=True, injections_pending=pending)):
                        logger.info("job %s completed", job.id)
                case Effect.FAIL_JOB:
                    assert round_row is not None
                    self.fail(session, job, round_row, now, reason)
                case Effect.FAIL_OPEN_ROUND:
                    if round_row is not None and round_table.allowed(RoundState(round_row.state), Event.FAIL):
                        fire(round_row, Event.FAIL, now)
                case Effect.FAIL_INJECTIONS:
                    injections.fail_pending(session, job.id, now)
                case Effect.FORGET_SUMS:
                    self._sums.forget(job.id)
                case Effect.DROP_PARTIALS:
                    assert round_row is not None
                    self._artifacts.drop_partials(job.id, round_row.number)
                case Effect.STORE_SCORES:
                    raise AssertionError("injection rows are applied by coordinator/injections.py")
        if job.state == JobState.FAILED.value and Effect.DROP_PARTIALS in rule.effects:
            logger.warning("job %s failed: %s", job.id, job.reason)
        return expired

    def fail(
        self, session: Session, job: Job, round_row: Round, now: datetime, reason: str, event: Event = Event.FAIL
    ) -> None:
        rule = fire(job, event, now)
        assert rule is not None
        self.apply(session, job, round_row, rule, now, reason=reason)

    def open_round(
        self, session: Session, job: Job, spec: JobSpec, number: int, kind: RoundKind, now: datetime
    ) -> Round:
        round_row = Round(
            job_id=job.id,
            number=number,
            kind=kind.value,
            state=RoundState.OPEN.value,
            selected=[],
            metrics={},
            opened_at=now,
            deadline_at=now + spec.round_deadline,
        )
        session.add(round_row)
        session.flush()
        logger.info("job %s: round %d (%s) opened", job.id, number, kind.value)
        return round_row
