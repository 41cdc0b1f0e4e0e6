"""The audit log: one row per state-changing action and per refused call (who, what, job, round, result).

Rows are written in their own transaction after the action's outcome is known, one per call (an upload's row
is written once its stream ends, never per chunk). What is audited:

- every call refused by authentication or authorization (`coordinator.access.AccessControl`);
- the outcome, success or status, of every state-changing RPC: SubmitJob, CancelJob, Enroll, UploadUpdate,
  ReportEvaluation, AbortRound;
- the failures of a silo's reads of a job (DownloadModel), since a silo reading a job it was not selected
  for is refused there;
- the operator's commands (silo add and revoke, cert revoke).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from coordinator.status import safe_text, status_for
from coordinator.store.database import Database
from coordinator.store.models import AuditEvent, utcnow
from fedmeki_core.errors import FedmekiError

OK = "OK"
OPERATOR = "operator"  # the actor of commands run where the database is
LOCAL = "local"


@dataclass
class AuditedCall:
    """What a call's audit row will say: who, about which job and round, filled in as the call learns them."""

    actor: str
    job_id: str = ""
    round_number: int | None = None


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    actor: str
    peer: str
    action: str
    job_id: str
    round_number: int | None
    status: str
    detail: str


class AuditLog:
    def __init__(self, database: Database) -> None:
        self._database = database

    def record(
        self,
        action: str,
        actor: str,
        peer: str,
        status: str,
        job_id: str = "",
        round_number: int | None = None,
        detail: str = "",
    ) -> None:
        with self._database.transaction() as session:
            session.add(
                AuditEvent(
                    at=utcnow(),
                    actor=safe_text(actor, 200),
                    peer=safe_text(peer, 200),
                    action=action,
                    job_id=safe_text(job_id, 32),
                    round_number=round_number,
                    status=status,
                    detail=safe_text(detail),
                )
            )

    def refusal(self, action: str, actor: str, peer: str, error: FedmekiError, job_id: str = "") -> None:
        self.record(action, actor, peer, status_for(error).name, job_id, detail=error.message)

    @contextmanager
    def call(
        self,
        action: str,
        actor: str,
        peer: str,
        job_id: str = "",
        round_number: int | None = None,
        failures_only: bool = False,
    ) -> Iterator[AuditedCall]:
        """Audit the outcome of the block: OK (unless `failures_only`), or the status its error maps to."""
        call = AuditedCall(actor=actor, job_id=job_id, round_number=round_number)
        try:
            yield call
        except FedmekiError as exc:
            self.record(action, call.actor, peer, status_for(exc).name, call.job_id, call.round_number, exc.message)
            raise
        except Exception:
            self.record(action, call.actor, peer, "INTERNAL", call.job_id, call.round_number)
            raise
        if not failures_only:
            self.record(action, call.actor, peer, OK, call.job_id, call.round_number)

    def recent(self, limit: int) -> list[AuditEntry]:
        """The newest `limit` rows, oldest first."""
        with self._database.read() as session:
            rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)).all()
        return [
            AuditEntry(r.at, r.actor, r.peer, r.action, r.job_id, r.round_number, r.status, r.detail)
            for r in reversed(rows)
        ]
