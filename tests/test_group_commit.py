"""GroupCommit's writes (issue 20): the checks and rows of many threads' writes share one transaction under the
caller's lock, each writer gets its own result or its own refusal, and a refused write leaves nothing behind."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator.store.database import Database
from coordinator.store.group_commit import GroupCommit
from coordinator.store.models import AuditEvent, Base, utcnow
from fedmeki_core.errors import ConflictError

WRITERS = 24


def _row(worker: int) -> AuditEvent:
    return AuditEvent(at=utcnow(), actor=f"silo:{worker}", peer="ipv4:127.0.0.1:1", action="UploadUpdate", status="OK")


def test_writes_share_commits_under_the_lock_and_a_refusal_is_its_writer_s_alone(database_url: str) -> None:
    database = Database(database_url)
    database.migrate()
    try:
        lock, commits = threading.Lock(), [0]
        event.listen(database.engine, "commit", lambda *_: commits.__setitem__(0, commits[0] + 1))
        group = GroupCommit(database, lock)
        start = threading.Barrier(WRITERS)

        def write(worker: int) -> int:
            def prepare(session: Session) -> tuple[list[Base], int]:
                assert lock.locked()  # the checks run under the caller's lock, as round state is changed under it
                # A writer's checks see the rows of the writers before it in the same transaction.
                session.scalars(select(AuditEvent)).all()
                if worker % 3 == 0:
                    raise ConflictError(f"writer {worker} refused")
                return [_row(worker)], worker * 10

            start.wait()
            return group.write(prepare)

        with ThreadPoolExecutor(WRITERS) as pool:
            futures = [pool.submit(write, worker) for worker in range(WRITERS)]
        for worker, future in enumerate(futures):
            if worker % 3 == 0:
                with pytest.raises(ConflictError, match=f"writer {worker} refused"):
                    future.result()
            else:
                assert future.result() == worker * 10
        with database.read() as session:
            actors = sorted(session.scalars(select(AuditEvent.actor)))
        assert actors == sorted(f"silo:{worker}" for worker in range(WRITERS) if worker % 3 != 0)
        assert commits[0] < WRITERS  # a transaction per write before
    finally:
        database.dispose()


def test_a_failed_commit_fails_every_write_of_its_batch(database_url: str) -> None:
    database = Database(database_url)
    database.migrate()
    try:
        group = GroupCommit(database)
        duplicate = AuditEvent(id=1, at=utcnow(), actor="a", peer="p", action="UploadUpdate", status="OK")
        group.add(duplicate)
        again = AuditEvent(id=1, at=utcnow(), actor="b", peer="p", action="UploadUpdate", status="OK")
        with pytest.raises(IntegrityError, match=r"(?i)unique|duplicate"):
            group.write(lambda _session: ([again], None))
        with database.read() as session:
            assert list(session.scalars(select(AuditEvent.actor))) == ["a"]
    finally:
        database.dispose()
