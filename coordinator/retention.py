"""What a committed round lets go: expired checkpoints (rows in the commit, files after it), spooled updates,
partial uploads, the previous round's server state and download deltas."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator import evaluations, injections
from coordinator.artifacts import Artifacts
from coordinator.download_deltas import drop_earlier_deltas
from coordinator.store.models import Checkpoint, utcnow


class Retention:
    def __init__(self, artifacts: Artifacts, keep_updates: bool, keep_checkpoints: int) -> None:
        self._artifacts = artifacts
        self._keep_updates = keep_updates
        self._keep_checkpoints = keep_checkpoints

    def expire_checkpoints(self, session: Session, job_id: str, newest: int) -> list[Path]:
        """Forget checkpoints beyond the retention (rows now, files after the commit); round 0 stays."""
        keep = self._keep_checkpoints
        if keep <= 0:
            return []
        # The injector and the evaluator still need these.
        waiting = injections.pending_rounds(session, job_id) | evaluations.waiting_rounds(session, job_id, utcnow())
        rows = [
            row
            for row in session.scalars(
                select(Checkpoint).where(
                    Checkpoint.job_id == job_id, Checkpoint.round_number > 0, Checkpoint.round_number <= newest - keep
                )
            )
            if row.round_number not in waiting
        ]
        for row in rows:
            session.delete(row)
        return [self._artifacts.absolute(row.path) for row in rows]

    def after_commit(self, job_id: str, number: int, expired: list[Path]) -> None:
        """The files round `number`'s commit made garbage."""
        if not self._keep_updates:
            self._artifacts.drop_round_updates(job_id, number)
        self._artifacts.drop_partials(job_id, number)
        self._artifacts.drop_server_state(job_id, number - 1)  # round `number`'s state supersedes it
        drop_earlier_deltas(self._artifacts, job_id, number)
        for old in expired:
            self._artifacts.recycle(old)
