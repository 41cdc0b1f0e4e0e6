"""The audit table stays bounded: refusals of callers without an identity are written at most so many a minute
(the rest counted), and rows past the retention are deleted."""

from __future__ import annotations

import time
from datetime import timedelta

import grpc
import pytest
from sqlalchemy import func, select

from coordinator.audit import AuditLog
from coordinator.server import Coordinator
from coordinator.store.database import Database
from coordinator.store.models import AuditEvent, utcnow
from fedmeki_core.errors import AuthenticationError, ForbiddenError
from fedmeki_core.proto.v1 import silo_pb2, silo_pb2_grpc
from tests.conftest import address


def _rows(database: Database, status: str) -> list[AuditEvent]:
    with database.read() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.status == status).order_by(AuditEvent.id)))


def test_a_flood_of_anonymous_calls_writes_a_bounded_number_of_rows(coordinator: Coordinator) -> None:
    """500 calls without a credential once wrote 500 rows in 2.4 s."""
    with grpc.insecure_channel(address(coordinator)) as channel:
        stub = silo_pb2_grpc.SiloServiceStub(channel)
        for _ in range(200):
            with pytest.raises(grpc.RpcError) as caught:
                stub.NextTask(silo_pb2.NextTaskRequest(tasks=["t"]))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # every caller still gets its answer
    assert len(_rows(coordinator.database, "UNAUTHENTICATED")) == 60  # audit_anonymous_refusals_per_minute


def test_left_out_refusals_are_counted_and_known_callers_always_written(database_url: str) -> None:
    database = Database(database_url)
    database.migrate()
    try:
        audit = AuditLog(database, anonymous_refusals_per_minute=2, window_seconds=0.5)
        for _ in range(5):
            audit.refusal("NextTask", "unknown", "ipv4:10.0.0.9:1", AuthenticationError("unknown silo credential"))
        for _ in range(3):
            audit.refusal("NextTask", "silo:a", "ipv4:10.0.0.1:1", ForbiddenError("silo 'a' has been revoked"))
        time.sleep(0.6)
        audit.refusal("NextTask", "unknown", "ipv4:10.0.0.9:1", AuthenticationError("unknown silo credential"))
        anonymous = _rows(database, "UNAUTHENTICATED")
        assert len(anonymous) == 3 and len(_rows(database, "PERMISSION_DENIED")) == 3
        assert "3 more such refusals before this one were not written" in anonymous[-1].detail
    finally:
        database.dispose()


def test_rows_past_the_retention_are_deleted(database_url: str) -> None:
    database = Database(database_url)
    database.migrate()
    try:
        with database.transaction() as session:
            for days in (400, 100, 1):
                session.add(
                    AuditEvent(
                        at=utcnow() - timedelta(days=days),
                        actor="operator",
                        peer="local",
                        action="silo add",
                        job_id="",
                        round_number=None,
                        status="OK",
                        detail=f"{days} days old",
                    )
                )
        AuditLog(database, retention_days=365).record("silo revoke", "operator", "local", "OK")
        with database.read() as session:
            kept = sorted(session.scalars(select(AuditEvent.detail)))
            assert session.scalar(select(func.count()).select_from(AuditEvent)) == 3
        assert kept == ["", "1 days old", "100 days old"]
        assert AuditLog(database).prune() == 0  # no retention: nothing deleted
    finally:
        database.dispose()
