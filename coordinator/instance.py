"""Failing closed at start: plaintext only on loopback unless the operator says so, and one coordinator at a time
per data directory and per database.

Two coordinators on one data directory delete each other's partial uploads; two on one database both commit the
same round transitions. `InstanceLock` holds, for the coordinator's whole life, an exclusive `flock` on a file in
the data directory and a lock on the database: a PostgreSQL session advisory lock on a connection of its own, or,
on SQLite, an `flock` on a file beside the database file. The kernel and the database server drop them when the
process dies, however it dies, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
from contextlib import suppress
from pathlib import Path
from typing import IO

from sqlalchemy import Connection, text

from coordinator.settings import CoordinatorSettings
from coordinator.store.database import Database
from fedmeki_core.errors import PreconditionError, UnavailableError
from fedmeki_core.metrics_endpoint import split_address

LOCK_FILE = "coordinator.lock"
# pg_advisory_lock's key for "the coordinator of this database" (advisory locks are per database).
_ADVISORY_KEY = 0x666D6B69  # "fmki"
_APPLICATION = "fedmeki-coordinator"


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT names a loopback address only (127.0.0.0/8, ::1, localhost)."""
    host, _ = split_address(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def require_closed_plaintext(settings: CoordinatorSettings) -> None:
    """Without a kit, the API and the dashboard speak plaintext to anyone who reaches them (anonymous callers may
    cancel jobs, read models and sniff silo credentials): only on loopback, unless `insecure_plaintext` says so."""
    if settings.kit is not None or settings.insecure_plaintext:
        return
    for name, address in (("address", settings.address), ("dashboard_address", settings.dashboard_address)):
        if address and not is_loopback(address):
            raise PreconditionError(
                f"refusing to serve plaintext on {address} ({name}) without a kit: give the coordinator its "
                "startup kit (--kit) for mTLS, listen on loopback, or pass --insecure-plaintext "
                "(FEDMEKI_COORDINATOR_INSECURE_PLAINTEXT=true) on a network you trust"
            )


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class _FileLock:
    """An exclusive, non-blocking `flock` on `path`, which holds the holder's pid and host for the next one."""

    def __init__(self, path: Path, what: str) -> None:
        self._path = path
        self._what = what
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UnavailableError(
                f"another coordinator ({holder}) is running on {self._what}: the lock {self._path} is held; "
                "run one coordinator per data directory and database"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(_holder())
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


class _AdvisoryLock:
    """A PostgreSQL session advisory lock, on a connection kept open (and named) for as long as it is held."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._connection: Connection | None = None

    def acquire(self) -> None:
        connection = self._database.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            connection.execute(text("SELECT set_config('application_name', :name, false)"), {"name": _application()})
            if connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": _ADVISORY_KEY}):
                self._connection = connection
                return
            holder = connection.scalar(
                text(
                    "SELECT a.application_name || ' (backend pid ' || a.pid || ')' FROM pg_locks l "
                    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.objid = :key AND l.database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database())"
                ),
                {"key": _ADVISORY_KEY},
            )
        except BaseException:
            connection.close()
            raise
        connection.close()
        url = self._database.engine.url.render_as_string(hide_password=True)
        raise UnavailableError(
            f"another coordinator ({holder or 'another session'}) is running on the database {url}: it holds the "
            "coordinator's advisory lock; run one coordinator per database"
        )

    def release(self) -> None:
        if self._connection is not None:
            with suppress(Exception):  # a lost connection has dropped the lock already
                self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _ADVISORY_KEY})
            self._connection.close()
            self._connection = None


def _application() -> str:
    return f"{_APPLICATION} {_holder()}"[:63]  # PostgreSQL keeps 63 bytes of it


class InstanceLock:
    """The data directory's lock and the database's, taken together at start and held until `release()`."""

    def __init__(self, data_dir: Path, database: Database) -> None:
        self._locks: list[_FileLock | _AdvisoryLock] = [
            _FileLock(data_dir / LOCK_FILE, f"the data directory {data_dir}")
        ]
        url = database.engine.url
        if url.get_backend_name() == "postgresql":
            self._locks.append(_AdvisoryLock(database))
        elif url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            sqlite_file = Path(str(url.database)).resolve()
            lock = sqlite_file.with_name(sqlite_file.name + ".lock")
            if lock != (data_dir / LOCK_FILE).resolve():
                self._locks.append(_FileLock(lock, f"the database {sqlite_file}"))

    def acquire(self) -> None:
        taken: list[_FileLock | _AdvisoryLock] = []
        try:
            for lock in self._locks:
                lock.acquire()
                taken.append(lock)
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            raise

    def release(self) -> None:
        for lock in reversed(self._locks):
            lock.release()
