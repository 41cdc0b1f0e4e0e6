"""Job names are plain text; a failed job insert leaves no file; a stored job's endless deadline is cut to a week."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from sqlalchemy import func, select

from coordinator.server import Coordinator
from coordinator.store.models import Job, Round
from coordinator.submissions import Submission
from fedmeki_core.jobspec import JobSpec, parse_job_spec
from fedmeki_core.spec_rules import MAX_DEADLINE_SECONDS
from fedmeki_core.wire import read_manifest
from tests.conftest import address, enroll, wait_until
from tests.silo_wire import RawSilo, job_spec, submit_raw, weights_bytes

BASE_SPEC = {"name": "ok", "task": "synthetic-vitals", "rounds": 1}


def _jobs(coordinator: Coordinator) -> int:
    with coordinator.database.read() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def _stored_files(coordinator: Coordinator) -> list[str]:
    return [str(p) for p in (coordinator.artifacts.root / "checkpoints").rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "name", ["nul\x00byte", "line\nbreak", "clear\x1b[2J\x1b[Hscreen", "bell\x07", "c1\x9bcontrol", "sep\u2028"]
)
def test_a_job_name_with_control_characters_is_refused(coordinator: Coordinator, name: str) -> None:
    RawSilo(address(coordinator), enroll(coordinator, "a")).poll()
    with pytest.raises(grpc.RpcError) as info:
        submit_raw(address(coordinator), job_spec(name=name), weights_bytes())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert str(info.value.details()).startswith("invalid job spec: name: must not contain control characters")
    assert _jobs(coordinator) == 0 and _stored_files(coordinator) == []


def test_a_failed_insert_leaves_no_weights_file(coordinator: Coordinator) -> None:
    # A spec the validators never saw (built unchecked): PostgreSQL refuses its NUL, and the insert fails after the
    # weights were moved into place. SQLite takes it; either way no file may outlive a job that is not recorded.
    RawSilo(address(coordinator), enroll(coordinator, "a")).poll()
    checked = parse_job_spec(BASE_SPEC)
    unchecked = JobSpec.model_construct(**{**dict(checked), "name": "nul\x00byte"})
    spool = coordinator.artifacts.spool("submissions")
    spool.write(weights_bytes())
    spool.sync()
    manifest = read_manifest(spool.path)
    try:
        coordinator.scheduler.create_job(unchecked, spool, manifest, Submission("test", "", ""))
    except Exception:  # PostgreSQL's refusal, whatever its driver calls it
        assert _jobs(coordinator) == 0
        assert _stored_files(coordinator) == [], "a failed insert left the weights behind"
        assert not list((coordinator.artifacts.root / "checkpoints").iterdir())
    else:
        assert _jobs(coordinator) == 1 and len(_stored_files(coordinator)) == 1
    finally:
        coordinator.artifacts.discard(spool)


def test_a_stored_jobs_endless_deadline_is_cut_to_a_week(coordinator: Coordinator) -> None:
    # Stored before deadlines were bounded: 1e300 seconds overflowed a datetime at every tick, for ever.
    RawSilo(address(coordinator), enroll(coordinator, "a")).poll()
    spec = parse_job_spec({**BASE_SPEC, "round_deadline_seconds": 1e300}, submission=False)
    spool = coordinator.artifacts.spool("submissions")
    spool.write(weights_bytes())
    spool.sync()
    job = coordinator.scheduler.create_job(spec, spool, read_manifest(spool.path), Submission("test", "", ""))
    wait_until(lambda: coordinator.scheduler.status(job.id).rounds)
    with coordinator.database.read() as session:
        (opened, deadline) = session.execute(select(Round.opened_at, Round.deadline_at)).one()
    week = timedelta(seconds=MAX_DEADLINE_SECONDS)  # from when the round selected its silos, just after it opened
    assert week <= deadline - opened < week + timedelta(minutes=1)
