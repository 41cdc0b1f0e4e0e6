"""The agent's own SQLite: its enrollment, per (job, round) how far it got and its failed attempts, and its
privacy ledger.

A task moves `downloaded -> trained -> uploaded` (training rounds) or `downloaded -> reported` (evaluation
rounds), or ends `abandoned` when the coordinator refuses it (round closed, update rejected) or the agent gives it
up (it failed `max_task_failures` times). Each step is
recorded, in one transaction checked against `TRANSITIONS`, only once its file is durable, so a restarted
agent resumes at the first step not recorded (`next_step`) and never trains or uploads a round twice.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fedmeki_core.files import private_dirs
from fedmeki_core.records import RoundKind

# Schema versions in order; a database at PRAGMA user_version N gets the migrations after the N-th.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE IF NOT EXISTS enrollment ("
        " id INTEGER PRIMARY KEY CHECK (id = 1),"
        " silo_id TEXT NOT NULL, silo_name TEXT NOT NULL, coordinator TEXT NOT NULL, credential TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS tasks ("
        " job_id TEXT NOT NULL, round INTEGER NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,"
        " checkpoint_path TEXT, checkpoint_sha256 TEXT, delta_path TEXT, delta_sha256 TEXT,"
        " num_samples INTEGER, metrics TEXT,"
        " updated_at TEXT NOT NULL DEFAULT (datetime('now')), PRIMARY KEY (job_id, round))",
    ),
    (  # the privacy ledger: one row per dataset a job's trained round released (silo_agent/privacy_budget.py)
        "CREATE TABLE IF NOT EXISTS privacy_ledger ("
        " dataset TEXT NOT NULL, job_id TEXT NOT NULL, round INTEGER NOT NULL, mode TEXT NOT NULL,"
        " noise_multiplier REAL NOT NULL, charged_at TEXT NOT NULL DEFAULT (datetime('now')),"
        " PRIMARY KEY (dataset, job_id, round))",
    ),
    (  # failed attempts at a (job, round), so a restart does not reset the bound (silo_agent/agent.py)
        "CREATE TABLE IF NOT EXISTS failures ("
        " job_id TEXT NOT NULL, round INTEGER NOT NULL, count INTEGER NOT NULL, reason TEXT NOT NULL,"
        " PRIMARY KEY (job_id, round))",
    ),
)

_TASK_COLUMNS = (
    "job_id, round, kind, status, checkpoint_path, checkpoint_sha256, delta_path, delta_sha256, num_samples, metrics"
)


class TaskStatus(enum.StrEnum):
    DOWNLOADED = "downloaded"
    TRAINED = "trained"
    UPLOADED = "uploaded"
    REPORTED = "reported"
    ABANDONED = "abandoned"


FINAL = frozenset({TaskStatus.UPLOADED, TaskStatus.REPORTED, TaskStatus.ABANDONED})

# Where a task may go from each status (None: no row yet).
TRANSITIONS: dict[TaskStatus | None, frozenset[TaskStatus]] = {
    None: frozenset({TaskStatus.DOWNLOADED}),
    # downloaded again: the checkpoint file was lost
    TaskStatus.DOWNLOADED: frozenset(
        {TaskStatus.DOWNLOADED, TaskStatus.TRAINED, TaskStatus.REPORTED, TaskStatus.ABANDONED}
    ),
    # downloaded again: the recorded delta file was lost, so nothing of it can have been uploaded twice
    TaskStatus.TRAINED: frozenset({TaskStatus.UPLOADED, TaskStatus.ABANDONED, TaskStatus.DOWNLOADED}),
    TaskStatus.UPLOADED: frozenset(),
    TaskStatus.REPORTED: frozenset(),
    TaskStatus.ABANDONED: frozenset(),
}


class Step(enum.StrEnum):
    """What the agent does next for a task."""

    DOWNLOAD = "download"
    TRAIN = "train"
    EVALUATE = "evaluate"
    UPLOAD = "upload"
    NOTHING = "nothing"


@dataclass(frozen=True)
class Enrollment:
    silo_id: str
    silo_name: str
    coordinator: str
    credential: str


@dataclass(frozen=True)
class StoredFile:
    path: Path
    sha256: str


@dataclass(frozen=True)
class TaskRecord:
    job_id: str
    round: int
    kind: RoundKind
    status: TaskStatus
    checkpoint: StoredFile | None = None  # the downloaded global model
    delta: StoredFile | None = None  # the trained update (training rounds)
    num_samples: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Charge:
    """One trained round of a DP job, charged to one dataset: a release of the Gaussian mechanism."""

    dataset: str
    job_id: str
    round: int
    mode: str  # "local" or "central" (DP-SGD rounds), or "statistics" (a statistics job's Gaussian noise)
    noise_multiplier: float


@dataclass(frozen=True)
class LedgerEntry:
    """What one job has spent on one dataset: `rounds` releases at `noise_multiplier`."""

    dataset: str
    job_id: str
    mode: str
    noise_multiplier: float
    rounds: int
    last_round: int
    last_charged_at: str


def next_step(record: TaskRecord | None, kind: RoundKind) -> Step:
    """The first step of a task not yet done, given what the state recorded and the files still there."""
    if record is None:
        return Step.DOWNLOAD
    if record.status in FINAL:
        return Step.NOTHING
    if record.status == TaskStatus.TRAINED and record.delta is not None and record.delta.path.is_file():
        return Step.UPLOAD
    if record.status == TaskStatus.DOWNLOADED and record.checkpoint is not None and record.checkpoint.path.is_file():
        return Step.TRAIN if kind == RoundKind.TRAIN else Step.EVALUATE  # an injection reports like an evaluation
    return Step.DOWNLOAD


class InvalidTransitionError(RuntimeError):
    """A step recorded out of order: a bug in the agent, never a condition to handle."""


class AgentState:
    """`work_dir/state.sqlite` (mode 0600: it holds the credential), WAL, every write one transaction."""

    def __init__(self, work_dir: Path) -> None:
        private_dirs(work_dir)
        os.chmod(work_dir, 0o700)  # deltas, downloads and the credential live here: the agent's eyes only
        self.path = work_dir / "state.sqlite"
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # before SQLite makes it world-readable
        os.chmod(self.path, 0o600)  # SQLite gives its -wal and -shm files the database's mode
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._migrate()

    def __enter__(self) -> AgentState:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._connection.close()

    def _migrate(self) -> None:
        with self._lock, self._transaction():
            version = int(self._connection.execute("PRAGMA user_version").fetchone()[0])
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    self._connection.execute(statement)
            self._connection.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")

    def save_enrollment(self, enrollment: Enrollment) -> None:
        with self._lock, self._transaction():
            self._connection.execute(
                "INSERT OR REPLACE INTO enrollment (id, silo_id, silo_name, coordinator, credential) "
                "VALUES (1, ?, ?, ?, ?)",
                (enrollment.silo_id, enrollment.silo_name, enrollment.coordinator, enrollment.credential),
            )

    def enrollment(self) -> Enrollment | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT silo_id, silo_name, coordinator, credential FROM enrollment WHERE id = 1"
            ).fetchone()
        return Enrollment(*row) if row else None

    def task(self, job_id: str, round_number: int) -> TaskRecord | None:
        with self._lock:
            return self._task(job_id, round_number)

    def recent_tasks(self, limit: int = 20) -> list[TaskRecord]:
        with self._lock:
            rows = self._connection.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks ORDER BY updated_at DESC, round DESC LIMIT ?",  # noqa: S608
                (limit,),
            ).fetchall()
        return [_record(row) for row in rows]

    def unfinished(self, job_id: str, before_round: int) -> list[TaskRecord]:
        """The job's tasks of rounds before `before_round` that did not reach a final status."""
        finals = tuple(status.value for status in FINAL)
        with self._lock:
            rows = self._connection.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE job_id = ? AND round < ? "  # noqa: S608
                f"AND status NOT IN ({', '.join('?' for _ in finals)}) ORDER BY round",
                (job_id, before_round, *finals),
            ).fetchall()
        return [_record(row) for row in rows]

    def record_download(self, job_id: str, round_number: int, kind: RoundKind, checkpoint: StoredFile) -> TaskRecord:
        """The round's starting checkpoint is on disk, verified."""
        return self._advance(
            job_id,
            round_number,
            TaskStatus.DOWNLOADED,
            kind=kind.value,
            checkpoint_path=str(checkpoint.path),
            checkpoint_sha256=checkpoint.sha256,
            delta_path=None,
            delta_sha256=None,
        )

    def record_training(
        self,
        job_id: str,
        round_number: int,
        delta: StoredFile,
        num_samples: int,
        metrics: dict[str, float],
        charges: Sequence[Charge] = (),
    ) -> TaskRecord:
        """The delta file is durable; what the upload will declare goes with it, and in the same transaction the
        round's privacy `charges` (a round trained again after a crash is not charged twice)."""
        return self._advance(
            job_id,
            round_number,
            TaskStatus.TRAINED,
            charges,
            delta_path=str(delta.path),
            delta_sha256=delta.sha256,
            num_samples=num_samples,
            metrics=json.dumps(metrics),
        )

    def count_failure(self, job_id: str, round_number: int, reason: str) -> int:
        """One more failed attempt at the (job, round) here, for `reason`; how many there have been."""
        with self._lock, self._transaction():
            self._connection.execute(
                "INSERT INTO failures (job_id, round, count, reason) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (job_id, round) DO UPDATE SET count = count + 1, reason = excluded.reason",
                (job_id, round_number, reason),
            )
            row = self._connection.execute(
                "SELECT count FROM failures WHERE job_id = ? AND round = ?", (job_id, round_number)
            ).fetchone()
        return int(row[0])

    def failure_reason(self, job_id: str, round_number: int) -> str | None:
        """Why the last attempt at the (job, round) here failed, if one did."""
        with self._lock:
            row = self._connection.execute(
                "SELECT reason FROM failures WHERE job_id = ? AND round = ?", (job_id, round_number)
            ).fetchone()
        return str(row[0]) if row else None

    def ledger(self, dataset: str | None = None) -> list[LedgerEntry]:
        """What every job spent on each dataset (or on `dataset`), by dataset then by the job's first charge."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT dataset, job_id, mode, noise_multiplier, count(*), max(round), max(charged_at) "
                "FROM privacy_ledger WHERE ? IS NULL OR dataset = ? "
                "GROUP BY dataset, job_id, mode, noise_multiplier ORDER BY dataset, min(rowid)",  # first charged first
                (dataset, dataset),
            ).fetchall()
        return [LedgerEntry(str(d), str(j), str(m), float(z), int(n), int(r), str(t)) for d, j, m, z, n, r, t in rows]

    def record_end(
        self,
        job_id: str,
        round_number: int,
        status: TaskStatus,
        num_samples: int | None = None,
        metrics: dict[str, float] | None = None,
    ) -> TaskRecord:
        """Uploaded, reported or abandoned: the coordinator has what it gets from this silo for the round."""
        if status not in FINAL:
            raise InvalidTransitionError(f"{status} does not end a task")
        fields: dict[str, object] = {}
        if num_samples is not None:
            fields["num_samples"] = num_samples
        if metrics is not None:
            fields["metrics"] = json.dumps(metrics)
        return self._advance(job_id, round_number, status, (), **fields)

    def _advance(
        self, job_id: str, round_number: int, status: TaskStatus, charges: Sequence[Charge] = (), **fields: object
    ) -> TaskRecord:
        with self._lock, self._transaction():
            self._connection.executemany(
                "INSERT OR IGNORE INTO privacy_ledger (dataset, job_id, round, mode, noise_multiplier) "
                "VALUES (?, ?, ?, ?, ?)",
                [(c.dataset, c.job_id, c.round, c.mode, c.noise_multiplier) for c in charges],
            )
            current = self._task(job_id, round_number)
            before = current.status if current else None
            if status not in TRANSITIONS[before]:
                raise InvalidTransitionError(f"job {job_id} round {round_number}: {before} -> {status} is not allowed")
            if current is None:
                self._connection.execute(
                    "INSERT INTO tasks (job_id, round, kind, status) VALUES (?, ?, ?, ?)",
                    (job_id, round_number, fields.pop("kind"), status.value),
                )
            fields.pop("kind", None)  # fixed by the first step
            assignments = "".join(f", {name} = ?" for name in fields)  # names come from this module only
            self._connection.execute(
                f"UPDATE tasks SET status = ?, updated_at = datetime('now'){assignments} "  # noqa: S608
                "WHERE job_id = ? AND round = ?",
                (status.value, *fields.values(), job_id, round_number),
            )
            record = self._task(job_id, round_number)
        assert record is not None
        return record

    def _task(self, job_id: str, round_number: int) -> TaskRecord | None:
        row = self._connection.execute(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE job_id = ? AND round = ?",  # noqa: S608
            (job_id, round_number),
        ).fetchone()
        return _record(row) if row else None

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises; the caller holds the lock."""
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        self._connection.execute("COMMIT")


def _file(path: object, sha256: object) -> StoredFile | None:
    return StoredFile(Path(str(path)), str(sha256)) if path and sha256 else None


def _record(row: tuple[object, ...]) -> TaskRecord:
    job_id, round_number, kind, status, checkpoint_path, checkpoint_sha256, delta_path, delta_sha256 = row[:8]
    samples, metrics = row[8:]
    return TaskRecord(
        job_id=str(job_id),
        round=int(str(round_number)),
        kind=RoundKind(str(kind)),
        status=TaskStatus(str(status)),
        checkpoint=_file(checkpoint_path, checkpoint_sha256),
        delta=_file(delta_path, delta_sha256),
        num_samples=int(str(samples)) if samples is not None else None,
        metrics=json.loads(str(metrics)) if metrics else {},
    )
