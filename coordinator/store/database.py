"""Engine and session set-up; the schema is created and upgraded by Alembic at start."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Connection, Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fedmeki_core.errors import UnavailableError
from fedmeki_core.files import private_file

_MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL syncs at checkpoints, not at each commit: a commit survives the process being killed (it is
    # in the WAL file, in the OS's cache), not a power loss or an OS crash (docs/operator-guide.md, "Durability").
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config(connection: Connection | None) -> Config:
    """Alembic's configuration for our migrations, running on `connection` (None: only to read the scripts)."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _cannot_open(url: URL, exc: OperationalError) -> str:
    detail = " ".join(line.strip() for line in str(exc.orig if exc.orig is not None else exc).splitlines())
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "postgresql" and "does not exist" in detail and f'"{url.database}"' in detail:
        where = f"-h {url.host or 'localhost'} -p {url.port or 5432}" + (f" -U {url.username}" if url.username else "")
        return (
            f'PostgreSQL database "{url.database}" does not exist ({shown}): create it first '
            f'(createdb {where} {url.database}, or CREATE DATABASE "{url.database}"), or give --db one that exists'
        )
    return f"cannot open the database {shown}: {detail}"


class Database:
    """One engine for the process; `transaction()` is the only way state is written."""

    def __init__(self, url: str) -> None:
        self.url = url
        # SQLite has one writer at a time, and a writer that finds the write lock taken polls for it, sleeping 1, 2,
        # 5 ... 100 ms between tries: under many concurrent writers a commit waited tens of ms for nothing. The
        # process's writers queue on a lock of their own instead (one coordinator per database: instance.py).
        self._writer: AbstractContextManager[object] = nullcontext()
        if url.startswith("sqlite"):
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_pragmas)
            self._writer = threading.RLock()
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest revision (creates it on an empty database). A SQLite file is made 0600
        first, whatever the umask (SQLite gives its -wal and -shm files the database file's mode). A database that
        cannot be opened is one line that says what to do, not a driver's traceback."""
        path = self.engine.url.database if self.engine.url.get_backend_name() == "sqlite" else None
        if path and path != ":memory:" and Path(path).parent.is_dir():
            for name in (path, f"{path}-wal", f"{path}-shm"):
                if name == path or Path(name).exists():
                    private_file(Path(name))
        try:
            connection = self.engine.connect()
        except OperationalError as exc:
            raise UnavailableError(_cannot_open(self.engine.url, exc)) from None
        with connection, connection.begin():
            command.upgrade(alembic_config(connection), "head")

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._writer, self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
