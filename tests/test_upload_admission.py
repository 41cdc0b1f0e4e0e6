"""An upload costs the servicer two scheduler calls (admit, then record) and admit one database read before the
bytes: a new update learns what it must match, a replay gets its receipt, each from one read; record then writes the
update row and the call's audit row in one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import save
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from coordinator.admission import Admission, UploadHeader
from coordinator.credentials import SiloIdentity
from coordinator.intake import Chunk
from coordinator.server import Coordinator
from coordinator.store.models import AuditEvent, Silo, Update
from fedmeki_core.proto.v1 import common_pb2
from fedmeki_core.records import RoundState, UpdateReceipt
from tests.conftest import address, coordinator_settings, enroll, serving
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes


@contextmanager
def _fired_here(coordinator: Coordinator, name: str) -> Iterator[list[tuple[Any, ...]]]:
    """The arguments of each of the engine's `name` events fired meanwhile on this thread (not the scheduler's, nor
    the long polls'): "begin" for the transactions begun, "before_cursor_execute" for the statements run."""
    fired: list[tuple[Any, ...]] = []
    caller = threading.get_ident()

    def listener(*arguments: Any) -> None:
        if threading.get_ident() == caller:
            fired.append(arguments)

    engine = coordinator.database.engine
    event.listen(engine, name, listener)
    try:
        yield fired
    finally:
        event.remove(engine, name, listener)


@contextmanager
def _committed_rows() -> Iterator[list[list[object]]]:
    """The new rows of each session's transaction that commits meanwhile, on any thread, one list per commit."""
    committed: list[list[object]] = []
    pending: dict[int, list[object]] = {}

    def flushed(session: Session, _context: object, _instances: object) -> None:
        pending.setdefault(id(session), []).extend(session.new)

    def done(session: Session) -> None:
        rows = pending.pop(id(session), [])
        if rows:
            committed.append(rows)

    event.listen(Session, "before_flush", flushed)
    event.listen(Session, "after_commit", done)
    try:
        yield committed
    finally:
        event.remove(Session, "before_flush", flushed)
        event.remove(Session, "after_commit", done)


def _identity(coordinator: Coordinator, name: str) -> SiloIdentity:
    with coordinator.database.read() as session:
        silo = session.scalars(select(Silo).where(Silo.name == name)).one()
    return SiloIdentity(id=silo.id, name=silo.name, role=silo.role)


def _silo_given_round_1(coordinator: Coordinator) -> tuple[RawSilo, common_pb2.Job]:
    """Silo "a" enrolled, a one-silo job submitted, and the silo's poll answered with round 1's task."""
    raw = RawSilo(address(coordinator), enroll(coordinator, "a"))
    raw.poll()
    job = submit_raw(address(coordinator), job_spec(min_silos=1), weights_bytes())
    give_up = time.monotonic() + 10
    while raw.poll() is None:
        assert time.monotonic() < give_up
        time.sleep(0.02)
    return raw, job


def test_admit_reads_the_database_once_for_a_new_update_and_for_a_replay(coordinator: Coordinator) -> None:
    raw = RawSilo(address(coordinator), enroll(coordinator, "a"))
    raw.poll()
    job = submit_raw(address(coordinator), job_spec(min_silos=1), weights_bytes())
    give_up = time.monotonic() + 10
    while not (rounds := coordinator.scheduler.status(job.id).rounds) or rounds[0].state != RoundState.TRAINING:
        assert time.monotonic() < give_up
        time.sleep(0.02)
    payload = save(tensors(0.1))
    header = UploadHeader(
        job_id=job.id,
        round=1,
        num_samples=10,
        metrics={},
        encoding="safetensors",
        total_size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    silo = _identity(coordinator, "a")

    with _fired_here(coordinator, "begin") as began:
        admitted = coordinator.scheduler.admit(silo, header)
    assert isinstance(admitted, Admission)
    assert len(began) == 1

    raw.upload(job.id, 1, payload)
    with _fired_here(coordinator, "begin") as began:
        replayed = coordinator.scheduler.admit(silo, header)
    assert replayed == UpdateReceipt(len(payload), header.sha256)
    assert len(began) == 1


def test_an_uploads_checks_read_the_jobs_spec_and_manifest_once_per_job(coordinator: Coordinator) -> None:
    """Hundreds of silos upload twice a round (UploadOffset, then UploadUpdate): the job's spec and manifest, JSON
    to decode, are read by the first check of the job only; the later ones read the round's state."""
    _, job = _silo_given_round_1(coordinator)
    payload = save(tensors(0.1))
    header = UploadHeader(job.id, 1, 10, {}, "safetensors", len(payload), hashlib.sha256(payload).hexdigest())
    silo = _identity(coordinator, "a")
    with _fired_here(coordinator, "before_cursor_execute") as first:
        assert isinstance(coordinator.scheduler.admit(silo, header), Admission)
    with _fired_here(coordinator, "before_cursor_execute") as later:
        coordinator.scheduler.check_upload(silo, job.id, 1)
        assert isinstance(coordinator.scheduler.admit(silo, header), Admission)
    assert any("jobs.spec" in statement for _, _, statement, *_ in first)
    assert later and not [s for _, _, s, *_ in later if "jobs.spec" in s or "jobs.manifest" in s]


def test_an_accepted_upload_commits_its_update_row_and_its_audit_row_together(coordinator: Coordinator) -> None:
    raw, job = _silo_given_round_1(coordinator)

    with _committed_rows() as committed:
        raw.upload(job.id, 1, save(tensors(0.1)))
    with_update = [rows for rows in committed if any(isinstance(row, Update) for row in rows)]
    assert len(with_update) == 1
    audited = [row for row in with_update[0] if isinstance(row, AuditEvent)]
    assert [(row.action, row.status, row.job_id, row.round_number) for row in audited] == [
        ("UploadUpdate", "OK", job.id, 1)
    ]
    # and no other audit row for the call
    others = [row for rows in committed if rows is not with_update[0] for row in rows if isinstance(row, AuditEvent)]
    assert [row.action for row in others if row.action == "UploadUpdate"] == []


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Coordinator]:
    yield from serving(Coordinator(coordinator_settings(tmp_path / "coordinator", blocking_workers=2)))


async def _no_chunks() -> AsyncIterator[Chunk]:
    return
    yield


async def _cancelled_while_queued(coordinator: Coordinator, admitted: Admission) -> None:
    """Record `admitted`, cancelled while its reception's opening waits behind a pool kept busy, then free the pool."""
    release = threading.Event()
    busy = [asyncio.ensure_future(coordinator.offload.run(release.wait)) for _ in range(2)]  # the whole pool
    await asyncio.sleep(0)
    recording = asyncio.ensure_future(coordinator.scheduler.record(admitted, _no_chunks()))
    await asyncio.sleep(0)
    recording.cancel()
    release.set()
    with contextlib.suppress(asyncio.CancelledError):
        await recording
    await asyncio.gather(*busy)


def test_an_upload_cancelled_while_its_reception_opens_frees_its_place(two_workers: Coordinator) -> None:
    """A silo killed while its upload waited for the blocking pool once left its (job, round, silo) "in progress"
    for good: every retry was refused ABORTED, and the round waited for it until its deadline."""
    coordinator = two_workers
    raw, job = _silo_given_round_1(coordinator)
    payload = save(tensors(0.1))
    header = UploadHeader(job.id, 1, 10, {}, "safetensors", len(payload), hashlib.sha256(payload).hexdigest())
    admitted = coordinator.scheduler.admit(_identity(coordinator, "a"), header)
    assert isinstance(admitted, Admission)
    asyncio.run(_cancelled_while_queued(coordinator, admitted))
    assert raw.upload(job.id, 1, payload).sha256 == header.sha256  # not ABORTED "already in progress"
