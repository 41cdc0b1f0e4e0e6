"""An upload costs the servicer two scheduler calls (admit, then record) and admit one database read before the
bytes: a new update learns what it must match, a replay gets its receipt, each from one read."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from safetensors.numpy import save
from sqlalchemy import event, select
from sqlalchemy.engine import Connection

from coordinator.credentials import SiloIdentity
from coordinator.intake import Admission, UploadHeader
from coordinator.server import Coordinator
from coordinator.store.models import Silo
from fedmeki_core.records import RoundState, UpdateReceipt
from tests.conftest import address, enroll
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes


@contextmanager
def _counted_reads(coordinator: Coordinator) -> Iterator[list[int]]:
    """The transactions (reads or writes) the database begins meanwhile on this thread (not the scheduler's)."""
    began: list[int] = []
    caller = threading.get_ident()

    def begin(connection: Connection) -> None:
        if threading.get_ident() == caller:
            began.append(1)

    engine = coordinator.database.engine
    event.listen(engine, "begin", begin)
    try:
        yield began
    finally:
        event.remove(engine, "begin", begin)


def _identity(coordinator: Coordinator, name: str) -> SiloIdentity:
    with coordinator.database.read() as session:
        silo = session.scalars(select(Silo).where(Silo.name == name)).one()
    return SiloIdentity(id=silo.id, name=silo.name, role=silo.role)


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

    with _counted_reads(coordinator) as began:
        admitted = coordinator.scheduler.admit(silo, header)
    assert isinstance(admitted, Admission)
    assert len(began) == 1

    raw.upload(job.id, 1, payload)
    with _counted_reads(coordinator) as began:
        replayed = coordinator.scheduler.admit(silo, header)
    assert replayed == UpdateReceipt(len(payload), header.sha256)
    assert len(began) == 1
