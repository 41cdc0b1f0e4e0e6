"""16 silos writing at once through the real coordinator, on SQLite and PostgreSQL: no "database is locked", no
lost or doubled row.

Each of 16 threads, released together, polls (a silo row write), uploads its update, sends it again (the replay
path reads and answers), and later reports the final evaluation twice; every call also writes an audit row.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from safetensors.numpy import load, save
from sqlalchemy import func, select

from coordinator.server import Coordinator
from coordinator.store.models import AuditEvent, Update
from fedmeki_core.proto.v1 import silo_pb2
from fedmeki_core.records import JobState, RoundState
from tests.conftest import address, enroll
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes
from tests.test_scheduler import wait_for_state

WRITERS = 16


def _together(work: Callable[[int], object]) -> list[object]:
    """Run work(0..15) on 16 threads released at the same instant; their results (or exceptions)."""
    start = threading.Barrier(WRITERS)

    def run(index: int) -> object:
        start.wait()
        try:
            return work(index)
        except grpc.RpcError as exc:
            return exc

    with ThreadPoolExecutor(WRITERS) as pool:
        return list(pool.map(run, range(WRITERS)))


def test_sixteen_concurrent_writers_count_exactly_once(
    coordinator: Coordinator, caplog: pytest.LogCaptureFixture
) -> None:
    target = address(coordinator)
    silos = [RawSilo(target, enroll(coordinator, f"w{i:02d}")) for i in range(WRITERS)]
    _together(lambda i: silos[i].poll())
    initial = weights_bytes(seed=2)
    job = submit_raw(target, job_spec(rounds=1, min_silos=WRITERS, round_deadline_seconds=600), initial)
    wait_for_state(coordinator, job.id, lambda s: s.rounds and s.rounds[-1].state == RoundState.TRAINING)

    def upload(i: int) -> tuple[object, object]:
        payload = save(tensors(float(i)))
        first = silos[i].upload(job.id, 1, payload, num_samples=i + 1)
        again = silos[i].upload(job.id, 1, payload, num_samples=i + 1)
        return first, again

    receipts = _together(upload)
    assert all(isinstance(r, tuple) and r[0] == r[1] for r in receipts), receipts
    wait_for_state(
        coordinator,
        job.id,
        lambda s: s.current_round == 1 and s.rounds[-1].number == 2 and s.rounds[-1].state == RoundState.TRAINING,
        timeout=30,
    )  # round 1 committed, and the evaluation round has selected the silos

    def report(i: int) -> grpc.StatusCode:
        request = silo_pb2.ReportEvaluationRequest(job_id=job.id, round=2, num_samples=i + 1)
        silos[i].call("ReportEvaluation", request)
        try:
            silos[i].call("ReportEvaluation", request)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    assert _together(report) == [grpc.StatusCode.ALREADY_EXISTS] * WRITERS
    status = wait_for_state(coordinator, job.id, lambda s: s.state.finished, timeout=30)
    assert status.state == JobState.COMPLETED

    with coordinator.database.read() as session:
        per_round = dict(
            session.execute(
                select(Update.round_number, func.count(func.distinct(Update.silo_id)))
                .where(Update.job_id == job.id)
                .group_by(Update.round_number)
            ).all()
        )
        rows = session.scalar(select(func.count()).select_from(Update))
        uploads_ok = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "UploadUpdate", AuditEvent.status == "OK")
        )
    assert per_round == {1: WRITERS, 2: WRITERS} and rows == 2 * WRITERS
    assert uploads_ok == 2 * WRITERS  # each upload and each replay audited once
    weights = np.arange(1, WRITERS + 1, dtype=np.float64)
    mean = float((weights * np.arange(WRITERS)).sum() / weights.sum())
    checkpoint = load(coordinator.artifacts.checkpoint_path(job.id, 1).read_bytes())
    for name, value in load(initial).items():
        np.testing.assert_allclose(checkpoint[name], value + mean, rtol=1e-6)
    assert not [r for r in caplog.records if "locked" in r.getMessage() or r.levelname == "ERROR"]
