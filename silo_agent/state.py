"""The agent's own SQLite: its enrollment and, per (job, round), how far it got.

A task moves `downloaded -> trained -> uploaded` (training rounds) or `downloaded -> reported` (evaluation
rounds), or ends `abandoned` when the coordinator says the round is closed. Each step is recorded only once
its file is durable, so a restarted agent resumes at the first step not recorded, and never trains or
uploads a round twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS enrollment (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    silo_id TEXT NOT NULL,
    silo_name TEXT NOT NULL,
    coordinator TEXT NOT NULL,
    credential TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    delta_path TEXT,
    delta_sha256 TEXT,
    num_samples INTEGER,
    metrics TEXT,
    updated_at TEXT NOT NULL DEFAULT (datetime('now')),
    PRIMARY KEY (job_id, round)
);
"""

STATUSES = ("downloaded", "trained", "uploaded", "reported", "abandoned")
FINAL = frozenset({"uploaded", "reported", "abandoned"})


@dataclass(frozen=True)
class Enrollment:
    silo_id: str
    silo_name: str
    coordinator: str
    credential: str


@dataclass(frozen=True)
class TaskRecord:
    job_id: str
    round: int
    kind: str
    status: str
    delta_path: Path | None
    delta_sha256: str | None
    num_samples: int | None
    metrics: dict[str, float]


class AgentState:
    def __init__(self, work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        path = work_dir / "state.sqlite"
        fresh = not path.exists()
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if fresh:
            os.chmod(path, 0o600)  # it holds the silo's credential
        self._lock = threading.Lock()
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.executescript(_SCHEMA)

    def close(self) -> None:
        self._connection.close()

    def save_enrollment(self, enrollment: Enrollment) -> None:
        with self._lock:
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
            row = self._connection.execute(
                "SELECT job_id, round, kind, status, delta_path, delta_sha256, num_samples, metrics "
                "FROM tasks WHERE job_id = ? AND round = ?",
                (job_id, round_number),
            ).fetchone()
        return _record(row) if row else None

    def recent_tasks(self, limit: int = 20) -> list[TaskRecord]:
        with self._lock:
            rows = self._connection.execute(
                "SELECT job_id, round, kind, status, delta_path, delta_sha256, num_samples, metrics "
                "FROM tasks ORDER BY updated_at DESC, round DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_record(row) for row in rows]

    def record(
        self,
        job_id: str,
        round_number: int,
        kind: str,
        status: str,
        *,
        delta_path: Path | None = None,
        delta_sha256: str | None = None,
        num_samples: int | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Move a task to `status`, keeping what earlier steps recorded unless given anew."""
        if status not in STATUSES:
            raise ValueError(f"unknown task status {status!r}")
        with self._lock:
            self._connection.execute(
                "INSERT INTO tasks (job_id, round, kind, status, delta_path, delta_sha256, num_samples, metrics) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (job_id, round) DO UPDATE SET status = excluded.status, "
                "delta_path = COALESCE(excluded.delta_path, delta_path), "
                "delta_sha256 = COALESCE(excluded.delta_sha256, delta_sha256), "
                "num_samples = COALESCE(excluded.num_samples, num_samples), "
                "metrics = COALESCE(excluded.metrics, metrics), updated_at = datetime('now')",
                (
                    job_id,
                    round_number,
                    kind,
                    status,
                    str(delta_path) if delta_path else None,
                    delta_sha256,
                    num_samples,
                    json.dumps(metrics) if metrics is not None else None,
                ),
            )


def _record(row: tuple[object, ...]) -> TaskRecord:
    job_id, round_number, kind, status, delta_path, delta_sha256, num_samples, metrics = row
    return TaskRecord(
        job_id=str(job_id),
        round=int(round_number),
        kind=str(kind),
        status=str(status),  # type: ignore[call-overload]
        delta_path=Path(str(delta_path)) if delta_path else None,
        delta_sha256=str(delta_sha256) if delta_sha256 else None,
        num_samples=int(num_samples) if num_samples is not None else None,  # type: ignore[call-overload]
        metrics=json.loads(str(metrics)) if metrics else {},
    )
