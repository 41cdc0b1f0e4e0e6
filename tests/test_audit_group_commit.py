"""Audit rows of concurrent calls share commits, and each call returns only once its row is durable (issue 20): a
coordinator killed right after calls were answered has every answered call's row."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

from sqlalchemy import event, func, select

from coordinator.audit import AuditLog
from coordinator.store.database import Database
from coordinator.store.models import AuditEvent

THREADS, EACH = 16, 10

# Writes audit rows from 8 threads for ever, printing each one's detail once `record` has returned (as a call is
# answered once its row is written), until the test kills it.
_WRITER = """
import sys, threading
from coordinator.audit import AuditLog
from coordinator.store.database import Database
database = Database(sys.argv[1])
log, lock = AuditLog(database), threading.Lock()
def write(worker):
    for index in range(10**9):
        log.record("UploadUpdate", f"silo:{worker}", "ipv4:127.0.0.1:1", "OK", detail=f"{worker}-{index}")
        with lock:
            print(f"{worker}-{index}", flush=True)
for worker in range(8):
    threading.Thread(target=write, args=(worker,)).start()
"""


def _commits(database: Database) -> list[int]:
    commits = [0]

    def counted(*_: object) -> None:
        commits[0] += 1

    event.listen(database.engine, "commit", counted)
    return commits


def test_concurrent_rows_share_commits_and_all_are_written(database_url: str) -> None:
    database = Database(database_url)
    database.migrate()
    try:
        log, commits = AuditLog(database), _commits(database)
        start = threading.Barrier(THREADS)

        def write(worker: int) -> None:
            start.wait()
            for index in range(EACH):
                log.record("NextTask", f"silo:{worker}", "ipv4:127.0.0.1:1", "OK", detail=f"{worker}-{index}")

        threads = [threading.Thread(target=write, args=(worker,)) for worker in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with database.read() as session:
            details = set(session.scalars(select(AuditEvent.detail)))
            assert session.scalar(select(func.count()).select_from(AuditEvent)) == THREADS * EACH
        assert details == {f"{worker}-{index}" for worker in range(THREADS) for index in range(EACH)}
        assert commits[0] < THREADS * EACH  # a commit per row before
    finally:
        database.dispose()


def test_a_killed_process_keeps_the_row_of_every_answered_call(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    database = Database(url)
    database.migrate()
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER, url], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent
    ) as writer:
        assert writer.stdout is not None
        answered = [writer.stdout.readline().strip() for _ in range(300)]
        writer.send_signal(signal.SIGKILL)
    try:
        with database.read() as session:
            written = set(session.scalars(select(AuditEvent.detail)))
        assert all(answered) and set(answered) <= written
    finally:
        database.dispose()
