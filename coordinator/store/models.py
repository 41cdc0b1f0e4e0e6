"""SQLAlchemy models of the coordinator's state. The Alembic migrations create exactly this schema."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Silo(Base):
    __tablename__ = "silos"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    enrollment_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    credential_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    tasks: Mapped[list[str]] = mapped_column(JSON, default=list)
    role: Mapped[str] = mapped_column(String(20), default="trainer")  # "trainer", "injector" or "evaluator"
    device: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    enrolled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Job(Base):
    __tablename__ = "jobs"
    # A submitter's request id names one job (coordinator/submissions.py); NULL (no id) never conflicts. A unique
    # index, not a constraint: SQLite adds it without copying the table (which its foreign keys would refuse).
    __table_args__ = (Index("ix_jobs_submitted_by_request_id", "submitted_by", "request_id", unique=True),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    manifest: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    current_round: Mapped[int] = mapped_column(Integer, default=0)
    submitted_by: Mapped[str] = mapped_column(String(200), default="")  # "researcher:NAME", "anonymous" without TLS
    request_id: Mapped[str | None] = mapped_column(String(64))  # the submitter's id of the SubmitJob; None: none sent
    request_digest: Mapped[str] = mapped_column(String(64), default="")  # sha256 of spec, weights and CKKS context
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("job_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20))
    selected: Mapped[list[str]] = mapped_column(JSON, default=list)  # silo ids
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    opened_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(UtcDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Update(Base):
    """A silo's accepted contribution to a round: a spooled delta, or the metrics of an evaluation."""

    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("job_id", "round_number", "silo_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    round_number: Mapped[int] = mapped_column(Integer)
    silo_id: Mapped[str] = mapped_column(ForeignKey("silos.id"))
    num_samples: Mapped[int] = mapped_column(BigInteger)
    weight: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(Text, default="")  # relative to the data directory; "" for evaluations
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    round_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Injection(Base):
    """The injection stage on one checkpoint: pending until the injector reports its per-task scores."""

    __tablename__ = "injections"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    round_number: Mapped[int] = mapped_column(Integer, primary_key=True)  # the checkpoint's round
    state: Mapped[str] = mapped_column(String(20), index=True)  # pending, done, failed
    silo_id: Mapped[str | None] = mapped_column(ForeignKey("silos.id"))  # the injector that reported
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


EVALUATION_PENDING, EVALUATION_DONE = "pending", "done"  # an evaluation past its deadline is shown as missed


class Evaluation(Base):
    """The evaluator silo's score of one committed checkpoint: pending until it reports (or its deadline)."""

    __tablename__ = "evaluations"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    round_number: Mapped[int] = mapped_column(Integer, primary_key=True)  # the checkpoint's round
    silo_id: Mapped[str] = mapped_column(ForeignKey("silos.id"), index=True)  # the job's evaluator
    state: Mapped[str] = mapped_column(String(20), index=True)  # EVALUATION_PENDING or EVALUATION_DONE
    num_samples: Mapped[int] = mapped_column(BigInteger, default=0)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class RevokedCertificate(Base):
    """A certificate refused from now on, whoever it names (researcher, admin or silo)."""

    __tablename__ = "revoked_certificates"

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)  # lower-case hex
    subject: Mapped[str] = mapped_column(String(200), default="")  # "role:name", when known
    reason: Mapped[str] = mapped_column(Text, default="")
    revoked_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class AuditEvent(Base):
    """One state-changing action, or one refused call: who, what, on which job and round, with what result."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))  # "silo:NAME", "researcher:NAME", "operator", "unknown"
    peer: Mapped[str] = mapped_column(String(200), default="")  # the caller's address; "local" for commands
    action: Mapped[str] = mapped_column(String(60))  # the RPC or command
    job_id: Mapped[str] = mapped_column(String(32), default="")
    round_number: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(30))  # OK or the gRPC status code's name
    detail: Mapped[str] = mapped_column(Text, default="")
