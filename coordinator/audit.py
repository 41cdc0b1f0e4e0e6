"""The audit log: one row per state-changing action and per refused call (who, what, job, round, result).

Rows are written after the action's outcome is known, one per call (an upload's row is written once its stream
ends, never per chunk), and a call is answered only once its row is committed. Rows of concurrent calls share
one commit (`GroupCommit`): each waits for the first commit that starts after its row was queued. What is
audited:

- every call refused by authentication or authorization (`coordinator.access.AccessControl`);
- the outcome, success or status, of every state-changing RPC: SubmitJob, CancelJob, Enroll, UploadUpdate,
  ReportEvaluation, AbortRound;
- the failures of a silo's reads of a job (DownloadModel), since a silo reading a job it was not selected
  for is refused there;
- the operator's commands (silo add and revoke, cert revoke).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from coordinator.offload import Offload
from coordinator.status import database_unavailable, safe_text, status_for
from coordinator.store.database import Database
from coordinator.store.group_commit import GroupCommit
from coordinator.store.models import AuditEvent, utcnow
from fedmeki_core.errors import AuthenticationError, FedmekiError

OK = "OK"
OPERATOR = "operator"  # the actor of commands run where the database is
LOCAL = "local"


@dataclass
class AuditedCall:
    """What a call's audit row will say: who, about which job and round, filled in as the call learns them."""

    actor: str
    job_id: str = ""
    round_number: int | None = None
    witnessed: bool = False  # its OK row was handed out (`AuditLog.witness`), to commit with what the call did


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
    """Writes and reads the audit rows.

    Refusals of callers without a valid identity (UNAUTHENTICATED) are written at most
    `anonymous_refusals_per_minute` a minute (`window_seconds`; 0: all); the ones past it are counted, and the next
    such row written says how many were left out. With `retention_days`, rows older than that are deleted, at most
    once an hour, as rows are written.
    """

    def __init__(
        self,
        database: Database,
        retention_days: float = 0,
        anonymous_refusals_per_minute: int = 0,
        window_seconds: float = 60.0,
    ) -> None:
        self._database = database
        self._rows = GroupCommit(database)
        self._window = window_seconds
        self._retention = timedelta(days=retention_days) if retention_days > 0 else None
        self._per_minute = anonymous_refusals_per_minute
        self._lock = threading.Lock()
        self._window_start = -math.inf
        self._written = 0  # anonymous refusals written in this minute
        self._left_out = 0  # and left out since the last one written
        self._next_prune = -math.inf

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
        self._rows.add(_row(action, actor, peer, status, job_id, round_number, detail))
        self._prune_hourly()

    def witness(self, action: str, call: AuditedCall, peer: str) -> AuditEvent:
        """The OK row of `call` (of `awaited_call`), for the use case to commit in the transaction that records
        what the call did: one commit, and the row exists exactly when the action does. The block's end then
        writes no second OK row; a failure still writes its own."""
        call.witnessed = True
        return _row(action, call.actor, peer, OK, call.job_id, call.round_number)

    def refusal(self, action: str, actor: str, peer: str, error: FedmekiError, job_id: str = "") -> None:
        detail = error.message
        if isinstance(error, AuthenticationError) and self._per_minute > 0:
            left_out = self._anonymous_slot()
            if left_out is None:
                return
            if left_out:
                detail = f"{detail} ({left_out} more such refusals before this one were not written)"
        self.record(action, actor, peer, status_for(error).name, job_id, detail=detail)

    def _anonymous_slot(self) -> int | None:
        """None when this minute's anonymous refusals are all written already; else how many were left out."""
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self._window:
                self._window_start, self._written = now, 0
            if self._written >= self._per_minute:
                self._left_out += 1
                return None
            self._written += 1
            left_out, self._left_out = self._left_out, 0
            return left_out

    def prune(self) -> int:
        """Delete the rows older than the retention (none without one); how many went."""
        if self._retention is None:
            return 0
        with self._database.transaction() as session:
            result = session.execute(delete(AuditEvent).where(AuditEvent.at < utcnow() - self._retention))
        return int(getattr(result, "rowcount", 0) or 0)

    def _prune_hourly(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._retention is None or now < self._next_prune:
                return
            self._next_prune = now + 3600.0
        self.prune()

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
        except Exception as exc:
            status, detail = _failure(exc)
            self.record(action, call.actor, peer, status, call.job_id, call.round_number, detail)
            raise
        if not failures_only:
            self.record(action, call.actor, peer, OK, call.job_id, call.round_number)

    @asynccontextmanager
    async def awaited_call(self, offload: Offload, action: str, actor: str, peer: str) -> AsyncIterator[AuditedCall]:
        """`call` for a block that awaits a stream, on the event loop: the row is written on the blocking pool. A call
        cancelled meanwhile (its client went away, or its connection died) is UNAVAILABLE."""
        call = AuditedCall(actor=actor)
        try:
            yield call
        except asyncio.CancelledError:
            detail = "the call ended under the coordinator: the client cancelled it or its connection died"
            status = "UNAVAILABLE"
            await offload.run(self.record, action, call.actor, peer, status, call.job_id, call.round_number, detail)
            raise
        except Exception as exc:
            status, detail = _failure(exc)
            await offload.run(self.record, action, call.actor, peer, status, call.job_id, call.round_number, detail)
            raise
        if not call.witnessed:
            await offload.run(self.record, action, call.actor, peer, OK, call.job_id, call.round_number)

    def recent(self, limit: int) -> list[AuditEntry]:
        """The newest `limit` rows, oldest first."""
        with self._database.read() as session:
            rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)).all()
        return [
            AuditEntry(r.at, r.actor, r.peer, r.action, r.job_id, r.round_number, r.status, r.detail)
            for r in reversed(rows)
        ]


def _row(
    action: str, actor: str, peer: str, status: str, job_id: str = "", round_number: int | None = None, detail: str = ""
) -> AuditEvent:
    return AuditEvent(
        at=utcnow(),
        actor=safe_text(actor, 200),
        peer=safe_text(peer, 200),
        action=action,
        job_id=safe_text(job_id, 32),
        round_number=round_number,
        status=status,
        detail=safe_text(detail),
    )


def _failure(exc: Exception) -> tuple[str, str]:
    """The status and detail an audit row gives a call that raised `exc`."""
    if isinstance(exc, FedmekiError):
        return status_for(exc).name, exc.message
    return ("UNAVAILABLE" if database_unavailable(exc) else "INTERNAL"), ""
