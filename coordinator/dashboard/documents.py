"""The dashboard's JSON documents: jobs, one job's rounds, its metric rows, the silos. Read-only, from the store.

A job's rounds come from `coordinator.store.views.job_status`, its metric rows from `fedmeki_core.round_report`
and its per-task table from `fedmeki_core.report`: the same values `fedmeki job show` and `fedmeki job report`
print. Nothing here names a credential, a token digest, a certificate or a file path.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import select

from coordinator.silos import SiloRegistry
from coordinator.store.database import Database
from coordinator.store.models import Job
from coordinator.store.views import job_status
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.records import RoundSummary
from fedmeki_core.report import task_report
from fedmeki_core.round_report import EVALUATOR, round_rows
from fedmeki_core.stored_spec import read_stored_spec

Document = dict[str, Any]

JOB_LIMIT = 200  # the newest jobs the list shows


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _spec(spec: JobSpec) -> Document:
    return {
        "name": spec.name,
        "task": spec.task,
        "algorithm": spec.algorithm.name,
        "architecture": spec.model.architecture,
        "total_rounds": spec.rounds,
        "min_silos": spec.min_silos,
        "secure_aggregation": spec.privacy.secure_aggregation,
        "injection": spec.injection is not None,
    }


def jobs(database: Database) -> Document:
    """The newest jobs first, each with its state and progress."""
    with database.read() as session:
        rows = session.scalars(select(Job).order_by(Job.created_at.desc()).limit(JOB_LIMIT)).all()
        return {"jobs": [_job_line(row) for row in rows]}


def _job_line(row: Job) -> Document:
    spec = read_stored_spec(row.spec)
    return {
        "id": row.id,
        **_spec(spec),
        "state": row.state,
        "reason": row.reason,
        "current_round": row.current_round,
        "submitted_by": row.submitted_by,
        "created_at": _time(row.created_at),
        "updated_at": _time(row.updated_at),
    }


def job(database: Database, job_id: str) -> Document:
    """One job: its settings, state, every round (who was selected, who reported, when), the injections and the
    evaluator's scores."""
    with database.read() as session:
        status = job_status(session, job_id)
    checkpoint = status.latest_checkpoint
    return {
        "id": status.id,
        **_spec(status.spec),
        "state": str(status.state),
        "reason": status.reason,
        "current_round": status.current_round,
        "created_at": _time(status.created_at),
        "updated_at": _time(status.updated_at),
        "latest_checkpoint": None
        if checkpoint is None
        else {"round": checkpoint.round, "size_bytes": checkpoint.size_bytes, "sha256": checkpoint.sha256},
        "rounds": [_round(summary) for summary in status.rounds],
        "injections": [_round(summary) for summary in status.injections],
        # The evaluator silo's scores of the checkpoints, apart from the rounds' (kind "evaluator").
        "evaluations": [{**_round(summary), "kind": EVALUATOR} for summary in status.evaluations],
    }


def _round(summary: RoundSummary) -> Document:
    seconds = (
        (summary.closed_at - summary.opened_at).total_seconds()
        if summary.opened_at is not None and summary.closed_at is not None
        else None
    )
    return {
        "number": summary.number,
        "kind": str(summary.kind),
        "state": str(summary.state),
        "selected_silos": list(summary.selected_silos),
        "reported_silos": list(summary.reported_silos),
        "updates": len(summary.reported_silos),
        "opened_at": _time(summary.opened_at),
        "closed_at": _time(summary.closed_at),
        "seconds": seconds,
        "metrics": summary.metrics,
    }


def metrics(database: Database, job_id: str) -> Document:
    """`fedmeki job report`'s rows (per round, task and silo, "all" being the weighted mean) and per-task table."""
    with database.read() as session:
        status = job_status(session, job_id)
    return {
        "id": status.id,
        "state": str(status.state),
        "rows": [asdict(row) for row in round_rows(status)],
        "tasks": [asdict(row) for row in task_report(status)],
    }


def silos(database: Database, liveness_seconds: float, now: datetime) -> Document:
    """Every registered silo with its last contact; `connected` as `fedmeki_silos_connected` counts it."""
    return {
        "liveness_seconds": liveness_seconds,
        "silos": [
            {
                "name": silo.name,
                "role": silo.role,
                "enrolled": silo.enrolled,
                "revoked": silo.revoked,
                "device": silo.device,
                "tasks": list(silo.tasks),
                "last_seen_at": _time(silo.last_seen_at),
                "connected": not silo.revoked
                and silo.last_seen_at is not None
                and (now - silo.last_seen_at).total_seconds() <= liveness_seconds,
            }
            for silo in SiloRegistry(database).list()
        ],
    }
