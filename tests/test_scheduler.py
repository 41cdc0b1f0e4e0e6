"""The round state machine over a real server and database, with a controllable clock for deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import load, save
from sqlalchemy import select

from coordinator.events import EventBus
from coordinator.server import Coordinator
from coordinator.store.models import Update
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import NotFoundError, PreconditionError
from fedmeki_core.proto.v1 import silo_pb2, silo_pb2_grpc
from fedmeki_core.records import JobState, JobStatus, RoundState, RoundSummary, UpdateAccepted
from tests.conftest import address, coordinator_settings, enroll
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, update_messages, weights_bytes


class FakeClock:
    def __init__(self) -> None:
        self._now = datetime(2026, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def timed_coordinator(tmp_path: Path, database_url: str, clock: FakeClock) -> Iterator[Coordinator]:
    instance = Coordinator(coordinator_settings(tmp_path / "coordinator", database_url), clock=clock)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop(grace=0)


def wait_for_state(coordinator: Coordinator, job_id: str, predicate, timeout: float = 10.0) -> JobStatus:  # type: ignore[no-untyped-def]
    give_up = time.monotonic() + timeout
    while True:
        status = coordinator.scheduler.status(job_id)
        if predicate(status):
            return status
        assert time.monotonic() < give_up, f"job stuck: {status.state} {status.rounds}"
        time.sleep(0.02)


def _silos(coordinator: Coordinator, *names: str) -> list[RawSilo]:
    silos = [RawSilo(address(coordinator), enroll(coordinator, name)) for name in names]
    for silo in silos:
        silo.poll()
    return silos


def test_round_closes_at_the_deadline_with_enough_updates(timed_coordinator: Coordinator, clock: FakeClock) -> None:
    a, b, c = _silos(timed_coordinator, "a", "b", "c")
    job = submit_raw(
        address(timed_coordinator), job_spec(min_silos=2, rounds=1, round_deadline_seconds=60), weights_bytes()
    )
    wait_for_state(timed_coordinator, job.id, lambda s: s.rounds and s.rounds[0].state == RoundState.TRAINING)
    a.upload(job.id, 1, save(tensors(0.1)))
    b.upload(job.id, 1, save(tensors(0.3)))
    time.sleep(0.2)
    assert timed_coordinator.scheduler.status(job.id).current_round == 0  # c may still report
    clock.advance(61)
    status = wait_for_state(timed_coordinator, job.id, lambda s: s.current_round == 1)
    assert status.rounds[0].reported_silos == ("a", "b")
    assert status.rounds[0].selected_silos == ("a", "b", "c")
    with pytest.raises(grpc.RpcError) as late:
        c.upload(job.id, 1, save(tensors(0.2)))
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "closed" in late.value.details()


def test_job_fails_when_too_few_updates_arrive_by_the_deadline(
    timed_coordinator: Coordinator, clock: FakeClock
) -> None:
    a, _b = _silos(timed_coordinator, "a", "b")
    job = submit_raw(address(timed_coordinator), job_spec(min_silos=2, round_deadline_seconds=30), weights_bytes())
    wait_for_state(timed_coordinator, job.id, lambda s: s.rounds and s.rounds[0].state == RoundState.TRAINING)
    a.upload(job.id, 1, save(tensors(0.1)))
    clock.advance(31)
    status = wait_for_state(timed_coordinator, job.id, lambda s: s.state.finished)
    assert status.state == JobState.FAILED
    assert status.reason == "round 1: 1 updates before the deadline, min_silos is 2"
    assert status.rounds[0].state == RoundState.FAILED


def test_open_round_waits_for_eligible_silos_then_fails_at_the_deadline(
    timed_coordinator: Coordinator, clock: FakeClock
) -> None:
    enroll(timed_coordinator, "quiet")  # enrolled, but never polls: not eligible
    _silos(timed_coordinator, "active")
    job = submit_raw(address(timed_coordinator), job_spec(min_silos=2, round_deadline_seconds=30), weights_bytes())
    time.sleep(0.3)
    assert timed_coordinator.scheduler.status(job.id).rounds[0].state == RoundState.OPEN
    clock.advance(31)
    status = wait_for_state(timed_coordinator, job.id, lambda s: s.state.finished)
    assert status.state == JobState.FAILED
    assert status.reason == "round 1: only 1 eligible silos (min_silos 2) polled before the deadline"


def test_silos_without_data_for_the_task_are_not_selected(sqlite_coordinator: Coordinator) -> None:
    target = address(sqlite_coordinator)
    with_data = RawSilo(target, enroll(sqlite_coordinator, "with-data"))
    with_data.poll()
    without = RawSilo(target, enroll(sqlite_coordinator, "without-data"))
    from fedmeki_core.proto.v1 import silo_pb2, silo_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        silo_pb2_grpc.SiloServiceStub(channel).NextTask(
            silo_pb2.NextTaskRequest(tasks=[], wait_seconds=0), metadata=without.metadata
        )
    job = submit_raw(target, job_spec(min_silos=1), weights_bytes())
    status = wait_for_state(sqlite_coordinator, job.id, lambda s: s.rounds and s.rounds[0].selected_silos)
    assert status.rounds[0].selected_silos == ("with-data",)


def test_cancel_stops_a_running_job_and_refuses_its_uploads(coordinator: Coordinator) -> None:
    (a,) = _silos(coordinator, "a")
    job = submit_raw(address(coordinator), job_spec(min_silos=1, rounds=3), weights_bytes())
    wait_for_state(coordinator, job.id, lambda s: s.rounds and s.rounds[0].state == RoundState.TRAINING)
    with FedmekiClient(address(coordinator)) as client:
        cancelled = client.cancel_job(job.id, "wrong learning rate")
        assert cancelled.state == JobState.CANCELLED and cancelled.reason == "wrong learning rate"
        assert cancelled.rounds[0].state == RoundState.FAILED
        with pytest.raises(PreconditionError, match="already cancelled"):
            client.cancel_job(job.id)
    with pytest.raises(grpc.RpcError) as refused:
        a.upload(job.id, 1, save(tensors(0.1)))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert a.poll() is None


def test_watch_streams_rounds_updates_and_the_end(sqlite_coordinator: Coordinator) -> None:
    a, b = _silos(sqlite_coordinator, "a", "b")
    job = submit_raw(address(sqlite_coordinator), job_spec(min_silos=2, rounds=2), weights_bytes())
    events: list[object] = []
    with FedmekiClient(address(sqlite_coordinator)) as client:
        watcher = threading.Thread(target=lambda: events.extend(client.watch_job(job.id)))
        watcher.start()
        for round_number in (1, 2):
            wait_for_state(
                sqlite_coordinator,
                job.id,
                lambda s, r=round_number: len(s.rounds) >= r and s.rounds[r - 1].state == RoundState.TRAINING,
            )
            a.upload(job.id, round_number, save(tensors(0.1)), num_samples=5)
            b.upload(job.id, round_number, save(tensors(0.2)), num_samples=15)
        wait_for_state(
            sqlite_coordinator, job.id, lambda s: s.rounds[-1].state == RoundState.TRAINING and len(s.rounds) == 3
        )
        for silo in (a, b):
            task = silo.poll()
            assert task is not None and task.round == 3
            from fedmeki_core.proto.v1 import common_pb2, silo_pb2, silo_pb2_grpc

            with grpc.insecure_channel(address(sqlite_coordinator)) as channel:
                silo_pb2_grpc.SiloServiceStub(channel).ReportEvaluation(
                    silo_pb2.ReportEvaluationRequest(
                        job_id=job.id,
                        round=3,
                        num_samples=10,
                        metrics=common_pb2.Metrics(values={"eval_accuracy": 0.9}),
                    ),
                    metadata=silo.metadata,
                )
        watcher.join(timeout=10)
    assert not watcher.is_alive()
    assert isinstance(events[0], JobStatus)
    final = events[-1]
    assert isinstance(final, JobStatus) and final.state == JobState.COMPLETED
    committed = [e.number for e in events if isinstance(e, RoundSummary) and e.state == RoundState.COMMITTED]
    assert committed == [1, 2, 3]
    accepted = [(e.round, e.silo) for e in events if isinstance(e, UpdateAccepted)]
    assert sorted(accepted) == [(1, "a"), (1, "b"), (2, "a"), (2, "b"), (3, "a"), (3, "b")]
    assert final.rounds[0].metrics == {"eval_accuracy": 0.5}
    assert final.rounds[2].metrics == {"eval_accuracy": 0.9}


def test_a_job_is_watched_only_while_a_subscriber_is_there() -> None:
    """The publisher builds a job's events only while it is watched (`EventBus.watched`)."""
    bus = EventBus()

    async def watch() -> None:
        assert not bus.watched("job-1")
        with bus.subscribe("job-1"):
            with bus.subscribe("job-1"):
                assert bus.watched("job-1") and not bus.watched("job-2")
            assert bus.watched("job-1")  # one subscriber is left
        assert not bus.watched("job-1")

    asyncio.run(watch())


def test_several_jobs_run_at_once(sqlite_coordinator: Coordinator) -> None:
    a, b = _silos(sqlite_coordinator, "a", "b")
    target = address(sqlite_coordinator)
    first = submit_raw(target, job_spec(name="first", min_silos=2), weights_bytes(1))
    second = submit_raw(target, job_spec(name="second", min_silos=1, silos=["b"]), weights_bytes(2))
    for job in (first, second):
        wait_for_state(sqlite_coordinator, job.id, lambda s: s.rounds and s.rounds[0].state == RoundState.TRAINING)
    a.upload(first.id, 1, save(tensors(0.1)))
    b.upload(second.id, 1, save(tensors(0.2)))
    b.upload(first.id, 1, save(tensors(0.3)))
    for job in (first, second):
        status = wait_for_state(sqlite_coordinator, job.id, lambda s: s.current_round == 1)
        assert status.state == JobState.RUNNING
    assert sqlite_coordinator.scheduler.status(second.id).rounds[0].selected_silos == ("b",)


def test_checkpoint_retention_keeps_round_zero_and_the_newest(tmp_path: Path) -> None:
    instance = Coordinator(coordinator_settings(tmp_path / "c", keep_checkpoints=1))
    instance.start()
    try:
        (a,) = _silos(instance, "a")
        job = submit_raw(address(instance), job_spec(min_silos=1, rounds=3), weights_bytes())
        for number in (1, 2, 3):
            wait_for_state(
                instance,
                job.id,
                lambda s, n=number: len(s.rounds) >= n and s.rounds[n - 1].state == RoundState.TRAINING,
            )
            a.upload(job.id, number, save(tensors(0.1)))
        wait_for_state(instance, job.id, lambda s: s.current_round == 3)
        with FedmekiClient(address(instance)) as client:
            for kept in (0, 3):
                client.download_checkpoint(job.id, tmp_path / f"r{kept}.safetensors", kept)
            with pytest.raises(NotFoundError, match="has no checkpoint 2"):
                client.download_checkpoint(job.id, tmp_path / "r2.safetensors", 2)
        assert sorted(p.name for p in (instance.artifacts.root / "checkpoints" / job.id).iterdir()) == [
            "round-00000.safetensors",
            "round-00003.safetensors",
        ]
    finally:
        instance.stop(grace=0)


def test_the_aggregate_is_the_same_bits_whatever_order_updates_arrive_in(sqlite_coordinator: Coordinator) -> None:
    target = address(sqlite_coordinator)
    silos = _silos(sqlite_coordinator, "a", "b", "c")
    rng = np.random.default_rng(7)
    initial = save({"w": rng.normal(size=100_000).astype(np.float32)})
    deltas = {name: rng.normal(size=100_000).astype(np.float32) for name in ("a", "b", "c")}
    samples = {"a": 13, "b": 31, "c": 7}
    # Floating-point addition is not associative: in float32, two arrival orders give different sums.
    forward = sum((deltas[n] * np.float32(samples[n]) for n in "abc"), np.zeros(100_000, np.float32))
    backward = sum((deltas[n] * np.float32(samples[n]) for n in "cba"), np.zeros(100_000, np.float32))
    assert not np.array_equal(forward, backward)

    checkpoints = []
    for arrival in ("abc", "cba"):
        job = submit_raw(target, job_spec(min_silos=3, rounds=1), initial, chunk=1 << 20)
        wait_for_state(sqlite_coordinator, job.id, lambda s: s.rounds and s.rounds[0].state == RoundState.TRAINING)
        for name in arrival:
            silo = silos["abc".index(name)]
            silo.upload(job.id, 1, save({"w": deltas[name]}), num_samples=samples[name], chunk=1 << 20)
        wait_for_state(sqlite_coordinator, job.id, lambda s: s.current_round == 1)
        checkpoints.append(sqlite_coordinator.artifacts.checkpoint_path(job.id, 1).read_bytes())
    assert checkpoints[0] == checkpoints[1]


def _cancelled_mid_upload(silo: RawSilo, job_id: str) -> None:
    """A silo that dies mid-upload: its stream stops after a few chunks and the call is cancelled."""
    messages = update_messages(job_id, 1, save(tensors(5.0)), chunk=16)

    def stalled() -> Iterator[silo_pb2.UploadUpdateRequest]:
        yield from messages[:3]
        time.sleep(5)

    with grpc.insecure_channel(silo.address) as channel:
        call = silo_pb2_grpc.SiloServiceStub(channel).UploadUpdate.future(stalled(), metadata=silo.metadata)
        time.sleep(0.2)
        call.cancel()


@pytest.mark.parametrize(("killed", "committed"), [(2, True), (3, False)])
def test_dropout_mid_upload_closes_at_the_deadline_with_exactly_the_survivors(
    timed_coordinator: Coordinator, clock: FakeClock, killed: int, committed: bool
) -> None:
    silos = _silos(timed_coordinator, *(f"s{i}" for i in range(6)))
    initial = weights_bytes(seed=5)
    job = submit_raw(address(timed_coordinator), job_spec(min_silos=4, round_deadline_seconds=60), initial)
    wait_for_state(timed_coordinator, job.id, lambda s: s.rounds and s.rounds[0].state == RoundState.TRAINING)
    survivors = silos[killed:]
    for silo in silos[:killed]:
        _cancelled_mid_upload(silo, job.id)
    for index, silo in enumerate(survivors):
        silo.upload(job.id, 1, save(tensors(0.1 * (index + 1))), num_samples=10 * (index + 1))
    clock.advance(61)
    status = wait_for_state(timed_coordinator, job.id, lambda s: s.state.finished or s.current_round == 1)
    if not committed:
        assert status.state == JobState.FAILED and "min_silos is 4" in status.reason
        assert not timed_coordinator.artifacts.checkpoint_path(job.id, 1).exists()
        return
    weights = [10 * (i + 1) for i in range(len(survivors))]
    mean = sum(0.1 * (i + 1) * w for i, w in enumerate(weights)) / sum(weights)
    checkpoint = load(timed_coordinator.artifacts.checkpoint_path(job.id, 1).read_bytes())
    for name, value in load(initial).items():
        np.testing.assert_allclose(checkpoint[name], value + np.float32(mean), rtol=1e-6, atol=1e-6)
    assert len(status.rounds[0].reported_silos) == 4
    assert not list((timed_coordinator.artifacts.root / "incoming").rglob("*.tmp"))


def test_sixteen_silos_uploading_at_once_are_each_counted_exactly_once(coordinator: Coordinator) -> None:
    names = [f"s{i:02d}" for i in range(16)]
    silos = _silos(coordinator, *names)
    job = submit_raw(address(coordinator), job_spec(min_silos=16), weights_bytes())
    wait_for_state(coordinator, job.id, lambda s: s.rounds and s.rounds[0].state == RoundState.TRAINING)
    errors: list[BaseException] = []

    def upload(index: int) -> None:
        try:
            silos[index].upload(job.id, 1, save(tensors(0.01 * index)), num_samples=index + 1, chunk=8)
        except BaseException as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    status = wait_for_state(coordinator, job.id, lambda s: s.current_round == 1)
    assert status.rounds[0].reported_silos == tuple(names)
    with coordinator.database.read() as session:
        rows = session.scalars(select(Update.silo_id).where(Update.job_id == job.id)).all()
    assert len(rows) == len(set(rows)) == 16
