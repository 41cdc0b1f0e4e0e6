"""Shared fixtures: databases (SQLite files and fresh PostgreSQL databases), a real coordinator on port 0."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from coordinator.store.database import Database
from fedmeki_core.proto.v1 import silo_pb2, silo_pb2_grpc

POSTGRES_ENV = "FEDMEKI_TEST_POSTGRES_URL"

# One intra-op thread per torch process (this one, read when torch is first imported, and every agent, coordinator or
# bench process a test starts): scripts/test runs a worker per core, each starting trainers in threads and processes,
# and OpenMP's threads, spinning for the work of tiny models, cost 20-30% more CPU in the tests measured (a 3D CNN
# alone runs faster on two threads, but the workers already fill the cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _postgres_database(base_url: str, template: str | None = None) -> Iterator[str]:
    """A new PostgreSQL database for one test, empty or a copy of `template`; dropped afterwards."""
    name = f"fedmeki_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    try:
        yield make_url(base_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def migrated_postgres_template() -> Iterator[str]:
    """The name of a PostgreSQL database migrated to head once per session, for `database_url` to copy."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    for url in _postgres_database(base):
        database = Database(url)
        database.migrate()
        database.dispose()  # CREATE DATABASE ... TEMPLATE needs the template without connections
        yield str(make_url(url).database)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs on SQLite and on PostgreSQL.

    Where the test runs the `coordinator` fixture on it, whose first act is to migrate the database to head, the
    PostgreSQL database starts as a copy of one already there: copying a database is faster than migrating one,
    and tests/test_migrations.py migrates empty ones."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coordinator.db'}"
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    migrated = "coordinator" in request.fixturenames
    yield from _postgres_database(base, request.getfixturevalue("migrated_postgres_template") if migrated else None)


def coordinator_settings(data_dir: Path, db: str | None = None, **overrides: object) -> CoordinatorSettings:
    values: dict[str, object] = {
        "address": "127.0.0.1:0",
        "data_dir": data_dir,
        "db": db,
        "tick_seconds": 0.05,
        "max_poll_seconds": 2.0,
        "grace_seconds": 1.0,
    }
    values.update(overrides)
    return CoordinatorSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def coordinator(tmp_path: Path, database_url: str) -> Iterator[Coordinator]:
    """A real coordinator on 127.0.0.1 with an ephemeral port, stopped after the test."""
    yield from serving(Coordinator(coordinator_settings(tmp_path / "coordinator", database_url)))


@pytest.fixture
def sqlite_coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    """The same on SQLite only, for tests about one API rather than the store."""
    yield from serving(Coordinator(coordinator_settings(tmp_path / "coordinator")))


def serving(instance: Coordinator) -> Iterator[Coordinator]:
    """Start a coordinator for a fixture to yield; stopped when the test ends (`yield from serving(...)`)."""
    instance.start()
    try:
        yield instance
    finally:
        instance.stop(grace=0)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll `predicate` until it holds; fail the test if it does not within `timeout` seconds."""
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, "condition not reached in time"
        time.sleep(0.02)


def address(coordinator: Coordinator) -> str:
    return f"127.0.0.1:{coordinator.port}"


def enroll(coordinator: Coordinator, name: str, role: str = "trainer") -> str:
    """Register (as `role`) and enroll a silo over gRPC; returns its credential."""
    _, token = coordinator.registry.add(name, role)
    with grpc.insecure_channel(address(coordinator)) as channel:
        response = silo_pb2_grpc.SiloServiceStub(channel).Enroll(silo_pb2.EnrollRequest(token=token))
    return str(response.credential)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database alone, for tests marked `postgres` that need no SQLite twin."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    yield from _postgres_database(base)
