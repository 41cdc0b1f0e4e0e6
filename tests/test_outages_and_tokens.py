"""A database outage reaches callers as UNAVAILABLE (retried), never INTERNAL; enrollment tokens expire."""

from __future__ import annotations

import threading
from datetime import timedelta

import grpc
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from coordinator.cli import main as coordinator_main
from coordinator.credentials import digest
from coordinator.server import Coordinator
from coordinator.silos import SiloRegistry
from coordinator.store.models import Silo, utcnow
from fedmeki_core.proto.v1 import jobs_pb2, jobs_pb2_grpc, silo_pb2, silo_pb2_grpc
from silo_agent.transport import GrpcTransport
from tests.conftest import address, coordinator_settings, enroll, serving
from tests.silo_wire import TASK, RawSilo


def _connections(postgres_url: str, allowed: bool) -> None:
    """Refuse (or allow again) new connections to the test's database, and cut the ones it has: an outage."""
    name = make_url(postgres_url).database
    admin = create_engine(make_url(postgres_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
            if not allowed:
                connection.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": name},
                )
    finally:
        admin.dispose()


@pytest.mark.postgres
def test_a_database_outage_is_unavailable_and_the_agent_retries_through_it(tmp_path, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    for coordinator in serving(Coordinator(coordinator_settings(tmp_path / "c", postgres_url))):
        credential = enroll(coordinator, "a")
        _connections(postgres_url, allowed=False)
        try:
            with grpc.insecure_channel(address(coordinator)) as channel:
                with pytest.raises(grpc.RpcError) as caught:
                    jobs_pb2_grpc.JobServiceStub(channel).GetJob(jobs_pb2.GetJobRequest(job_id="0" * 32))
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "database is unavailable" in str(caught.value.details())
            with pytest.raises(grpc.RpcError) as caught:
                RawSilo(address(coordinator), credential).poll()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # not INTERNAL, which agents do not retry
            threading.Timer(1.5, _connections, (postgres_url, True)).start()  # the database comes back
            agent = GrpcTransport(address(coordinator), credential, retry_max_seconds=30)
            try:
                assert agent.next_task([TASK], "cpu", 0) is None  # retried with backoff until it answered
            finally:
                agent.close()
        finally:
            _connections(postgres_url, allowed=True)


def _enroll(coordinator: Coordinator, token: str) -> silo_pb2.EnrollResponse:
    with grpc.insecure_channel(address(coordinator)) as channel:
        return silo_pb2_grpc.SiloServiceStub(channel).Enroll(silo_pb2.EnrollRequest(token=token))


def test_an_expired_enrollment_token_is_refused_and_a_new_one_works(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str]
) -> None:
    _, token = SiloRegistry(coordinator.database, timedelta(0)).add("late")  # expired as soon as made
    with pytest.raises(grpc.RpcError) as caught:
        _enroll(coordinator, token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "enrollment token of silo 'late' expired at" in str(caught.value.details())
    assert "fedmeki-coordinator silo token late" in str(caught.value.details())

    url = coordinator.database.engine.url.render_as_string(hide_password=False)
    assert coordinator_main(["silo", "token", "late", "--db", url, "--data-dir", str(coordinator.artifacts.root)]) == 0
    fresh = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
    assert _enroll(coordinator, fresh).silo_name == "late"
    with pytest.raises(grpc.RpcError):
        _enroll(coordinator, token)  # the old one is void


def test_a_token_from_before_expiry_was_carried_lives_a_ttl_from_registration(coordinator: Coordinator) -> None:
    with coordinator.database.transaction() as session:
        for name, age in (("old", timedelta(days=8)), ("recent", timedelta(days=1))):
            session.add(
                Silo(
                    id=name.ljust(32, "0"),
                    name=name,
                    enrollment_token_hash=digest(f"fmk-enroll_{name}-secret"),
                    tasks=[],
                    device="",
                    role="trainer",
                    created_at=utcnow() - age,
                )
            )
    with pytest.raises(grpc.RpcError) as caught:
        _enroll(coordinator, "fmk-enroll_old-secret")
    assert "expired" in str(caught.value.details())
    assert _enroll(coordinator, "fmk-enroll_recent-secret").silo_name == "recent"
