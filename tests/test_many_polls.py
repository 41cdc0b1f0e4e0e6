"""Hundreds of waiting silos cost the coordinator coroutines, not threads (issue 20).

A long poll used to hold one of the synchronous server's worker threads for its whole wait, so 80 silos polling
queued every upload and submission behind them. Here 120 silos, each on its own channel with its own credential,
wait in NextTask from one client event loop while a job is submitted and a full round runs; the coordinator's
threads stay within its settings. Then 1,000 polls connect, wait and go away: no waiter, thread or file descriptor
is left behind.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from safetensors.numpy import save

from coordinator.server import Coordinator
from fedmeki_core.proto.v1 import silo_pb2, silo_pb2_grpc
from fedmeki_core.records import JobState
from tests.conftest import address, coordinator_settings, enroll, serving, wait_until
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes

T = TypeVar("T")

POLLERS = 120
BLOCKING_WORKERS = 6
# Besides the blocking pool, at most: the servers' event loop, the scheduler, the running sums' fold worker and
# gRPC's asyncio poller (shared with the test's client).
FIXED_THREADS = 4
OTHER_TASK = "held-by-nobody"  # what the waiting silos hold: no job here needs it, so they wait the whole time


class PollingSilos:
    """Long polls from a client event loop in its own thread, each call on a channel of its own."""

    def __init__(self, target: str, loop: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._loop = loop
        self._open: list[tuple[grpc.aio.Channel, Any]] = []

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=60)

    def start(self, credentials: list[str], wait_seconds: float) -> None:
        async def start() -> None:
            for credential in credentials:
                channel = grpc.aio.insecure_channel(self._target)
                call = silo_pb2_grpc.SiloServiceStub(channel).NextTask(
                    silo_pb2.NextTaskRequest(tasks=[OTHER_TASK], wait_seconds=wait_seconds, device="cpu"),
                    metadata=(("authorization", f"Bearer {credential}"),),
                )
                self._open.append((channel, call))

        self._run(start())

    def pending(self) -> int:
        return sum(not call.done() for _, call in self._open)

    def disconnect(self) -> None:
        """Close every channel: the calls on them are cancelled, as when a silo's process or network goes away."""

        async def close() -> None:
            for channel, _ in self._open:
                await channel.close()

        self._run(close())
        self._open.clear()


@pytest.fixture(scope="module")
def client_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One client event loop for the module: gRPC's asyncio events for closed channels still reach it after a
    test (a loop closed under them makes gRPC log errors)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-pollers")
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


@pytest.fixture
def threads_before() -> int:
    """The test process's threads before the coordinator starts."""
    return threading.active_count()


@pytest.fixture
def crowded(tmp_path: Path, threads_before: int) -> Iterator[Coordinator]:
    settings = coordinator_settings(
        tmp_path / "coordinator", blocking_workers=BLOCKING_WORKERS, max_poll_seconds=120.0, silo_liveness_seconds=600
    )
    yield from serving(Coordinator(settings))


@pytest.fixture
def pollers(crowded: Coordinator, client_loop: asyncio.AbstractEventLoop) -> Iterator[PollingSilos]:
    silos = PollingSilos(address(crowded), client_loop)
    try:
        yield silos
    finally:
        silos.disconnect()


def test_a_submission_and_a_round_complete_while_a_hundred_silos_wait(
    crowded: Coordinator, pollers: PollingSilos, threads_before: int
) -> None:
    dispatcher = crowded.scheduler.dispatcher
    threads_bound = threads_before + BLOCKING_WORKERS + FIXED_THREADS
    worker = RawSilo(address(crowded), enroll(crowded, "worker"))
    worker.poll()  # live, holding the job's task
    pollers.start([enroll(crowded, f"waiting-{i}") for i in range(POLLERS)], wait_seconds=120.0)
    wait_until(lambda: dispatcher.waiting == POLLERS, timeout=60)
    wait_until(lambda: threading.active_count() <= threads_bound)  # a thread per waiting silo would be 120 more

    job = submit_raw(address(crowded), job_spec(rounds=1, round_deadline_seconds=600), weights_bytes())
    task = worker.poll(wait=30)
    assert task is not None and task.job_id == job.id
    assert len(worker.call("DownloadModel", silo_pb2.DownloadModelRequest(job_id=job.id, round=0))) > 1
    worker.upload(job.id, task.round, save(tensors(0.5)))
    evaluation = worker.poll(wait=30)  # round 1 committed; the final evaluation round
    assert evaluation is not None and evaluation.round == 2
    worker.call("ReportEvaluation", silo_pb2.ReportEvaluationRequest(job_id=job.id, round=2, num_samples=10))
    wait_until(lambda: crowded.scheduler.status(job.id).state == JobState.COMPLETED, timeout=60)

    assert pollers.pending() == POLLERS  # they waited through it all
    wait_until(lambda: dispatcher.waiting == POLLERS)
    wait_until(lambda: threading.active_count() <= threads_bound)
    assert crowded.slots.polls.in_use == POLLERS

    pollers.disconnect()
    wait_until(lambda: dispatcher.waiting == 0 and crowded.slots.polls.in_use == 0)


def test_a_thousand_polls_that_go_away_leave_nothing_behind(crowded: Coordinator, pollers: PollingSilos) -> None:
    dispatcher = crowded.scheduler.dispatcher
    credentials = [enroll(crowded, f"s{i}") for i in range(50)]

    def cycle() -> None:
        pollers.start(credentials, wait_seconds=120.0)
        wait_until(lambda: dispatcher.waiting == len(credentials), timeout=60)
        pollers.disconnect()
        wait_until(lambda: dispatcher.waiting == 0 and crowded.slots.polls.in_use == 0, timeout=60)

    cycle()  # the first opens what is kept for reuse: pooled connections, the blocking pool's threads
    threads, fds = threading.active_count(), _open_fds()
    for _ in range(19):
        cycle()
    # 1,000 polls in all: what they held went with them. Closed connections' descriptors go shortly after.
    wait_until(lambda: threading.active_count() <= threads and _open_fds() <= fds + 4)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
