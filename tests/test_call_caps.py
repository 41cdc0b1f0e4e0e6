"""Calls that last are capped per kind (job submissions, WatchJob streams, long polls): one past its cap is
RESOURCE_EXHAUSTED marked retry-later, which the client and the agent retry with backoff, and stalled submissions
are cut like stalled uploads; short calls always get in."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.numpy import save

from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from fedmeki_core.backoff import Backoff
from fedmeki_core.client import FedmekiClient
from fedmeki_core.convert_spec import job_spec_from_proto
from fedmeki_core.proto.v1 import jobs_pb2, jobs_pb2_grpc
from fedmeki_core.rpc_errors import RETRY_LATER
from silo_agent.transport import GrpcTransport
from tests.conftest import address, coordinator_settings, enroll, serving
from tests.in_process import in_process_agents
from tests.silo_wire import MANIFEST, TASK, RawSilo, job_spec, submit_raw, weights_bytes

WINDOW = 1.5  # upload_idle_seconds: how long a stalled submission lives


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Coordinator]:
    settings = coordinator_settings(
        tmp_path / "coordinator",
        max_concurrent_submissions=2,
        max_concurrent_watches=2,
        max_concurrent_polls=2,
        upload_idle_seconds=WINDOW,
        max_poll_seconds=30.0,
    )
    yield from serving(Coordinator(settings))


def _header_then_nothing(stop: threading.Event) -> Iterator[jobs_pb2.SubmitJobRequest]:
    weights = weights_bytes()
    yield jobs_pb2.SubmitJobRequest(
        header=jobs_pb2.SubmitJobHeader(
            spec=job_spec(), weights_size=len(weights), weights_sha256=hashlib.sha256(weights).hexdigest()
        )
    )
    stop.wait()


def _busy(error: grpc.RpcError, setting: str) -> bool:
    return (
        error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and setting in str(error.details())
        and RETRY_LATER in (error.trailing_metadata() or ())  # type: ignore[attr-defined]
    )


def test_stalled_submissions_are_capped_then_cut_and_short_calls_still_answer(capped: Coordinator) -> None:
    target = address(capped)
    silo = RawSilo(target, enroll(capped, "a"))
    stop = threading.Event()
    channel = grpc.insecure_channel(target)
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    try:
        stalled = [stub.SubmitJob.future(_header_then_nothing(stop), timeout=30) for _ in range(2)]
        while capped.slots.submissions.in_use < 2:
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(_header_then_nothing(stop), timeout=5)
        assert _busy(caught.value, "max_concurrent_submissions")
        assert stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=5).jobs == []  # short calls are not held up
        assert silo.poll() is None
        for call in stalled:
            assert call.exception(timeout=WINDOW + 10).code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[union-attr]
            assert "stalled" in str(call.exception().details())  # type: ignore[union-attr]
    finally:
        stop.set()
        channel.close()
    assert capped.slots.submissions.in_use == 0
    assert submit_raw(target, job_spec(), weights_bytes()).spec.name == "test"


def test_watch_streams_are_capped_and_the_client_retries_until_one_ends(capped: Coordinator) -> None:
    target = address(capped)
    enroll(capped, "a")
    job = submit_raw(target, job_spec(round_deadline_seconds=600), weights_bytes()).id
    channel = grpc.insecure_channel(target)
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    watches = [stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job)) for _ in range(2)]
    for watch in watches:
        next(watch)  # the snapshot: the stream holds its slot now
    try:
        with pytest.raises(grpc.RpcError) as caught:
            next(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job), timeout=5))
        assert _busy(caught.value, "max_concurrent_watches")
        threading.Timer(1.0, watches[0].cancel).start()  # one researcher stops watching
        with FedmekiClient(target) as client:
            snapshot = next(iter(client.watch_job(job)))  # refused at first, then let in
        assert snapshot is not None
    finally:
        for watch in watches:
            watch.cancel()
        channel.close()


def test_long_polls_are_capped_short_ones_answer_and_the_agent_retries(capped: Coordinator) -> None:
    target = address(capped)
    silos = [RawSilo(target, enroll(capped, f"s{i}")) for i in range(3)]
    pollers = [threading.Thread(target=silo.poll, args=(3.0,)) for silo in silos[:2]]
    for poller in pollers:
        poller.start()
    try:
        while capped.slots.polls.in_use < 2:
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as caught:
            silos[2].poll(wait=3.0)
        assert _busy(caught.value, "max_concurrent_polls")
        assert silos[2].poll() is None  # a poll that does not wait takes no slot
        agent = GrpcTransport(target, silos[2].credential, retry_max_seconds=30)
        try:
            assert agent.next_task([TASK], "cpu", 0.5) is None  # retried with backoff until a slot was free
        finally:
            agent.close()
    finally:
        for poller in pollers:
            poller.join()


def test_the_caps_stay_under_the_rpc_limit() -> None:
    with pytest.raises(ValidationError, match="max_concurrent_polls"):
        CoordinatorSettings(maximum_concurrent_rpcs=1000, max_concurrent_polls=1000)
    with pytest.raises(ValidationError, match="maximum_concurrent_rpcs"):
        CoordinatorSettings(maximum_concurrent_rpcs=100)


def test_backoff_doubles_its_ceiling_with_full_jitter_and_resets() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0)
    ceilings = []
    for _ in range(6):
        ceilings.append(backoff.ceiling())
        assert 0.0 <= backoff.next_delay() <= ceilings[-1]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    delays = {round(Backoff(initial=1.0, maximum=8.0).next_delay(), 6) for _ in range(20)}
    assert len(delays) > 10  # jittered: silos refused together do not come back together
    backoff.reset()
    assert backoff.ceiling() == 1.0


def test_an_unreachable_coordinator_is_retried_with_growing_jittered_waits(tmp_path: Path) -> None:
    """The agent's outer loop once waited a fixed 2 s after every failure."""
    settings = coordinator_settings(tmp_path / "coordinator")
    for coordinator in serving(Coordinator(settings)):
        (agent,) = in_process_agents(
            coordinator,
            tmp_path,
            "synthetic-vitals",
            8,
            silos=1,
            transport=lambda _, target, credential: GrpcTransport(target, credential, retry_max_seconds=0),
        )
    waits: list[float] = []

    class RecordingStop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(float(timeout or 0))
            if len(waits) == 8:
                self.set()
            return self.is_set()

    agent.run(RecordingStop())  # the coordinator is gone: every poll fails at once
    assert len(set(waits)) == len(waits)  # jittered
    assert max(waits[4:]) > 2.0 * 2  # the ceiling doubled past the old fixed wait


def test_a_busy_refusal_is_retried_with_a_hint_and_not_before(tmp_path: Path) -> None:
    """Nothing done on a refusal marked retry-later; the client's submission is sent again and lands once."""
    settings = coordinator_settings(tmp_path / "coordinator", max_concurrent_submissions=1, upload_idle_seconds=1.0)
    for coordinator in serving(Coordinator(settings)):
        target = address(coordinator)
        enroll(coordinator, "a")
        stop = threading.Event()
        with grpc.insecure_channel(target) as channel:
            held = jobs_pb2_grpc.JobServiceStub(channel).SubmitJob.future(_header_then_nothing(stop), timeout=30)
            while coordinator.slots.submissions.in_use < 1:
                time.sleep(0.02)
            weights = tmp_path / "w.safetensors"
            weights.write_bytes(weights_bytes())
            with FedmekiClient(target) as client:
                job = client.submit_job(
                    job_spec_from_proto(job_spec()), weights, check_model=False
                )  # waits out the stalled one
                assert [j.id for j in client.list_jobs()] == [job.id]
            stop.set()
            assert held.exception(timeout=10) is not None


def test_a_submission_header_past_the_job_header_cap_is_refused_before_it_is_buffered(
    sqlite_coordinator: Coordinator,
) -> None:
    """A 16 MiB submission header once cost the coordinator ~265 MB of memory to parse."""
    enroll(sqlite_coordinator, "a")
    rng = np.random.default_rng(0)
    weights = save(
        {name: rng.normal(size=shape).astype(dtype) for name, (shape, dtype) in MANIFEST.items()},
        metadata={"padding": "x" * (2 << 20)},
    )
    with pytest.raises(grpc.RpcError) as caught:
        submit_raw(address(sqlite_coordinator), job_spec(), weights, chunk=1 << 20)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"exceeds the limit of {1 << 20}" in str(caught.value.details())
    assert RETRY_LATER not in (caught.value.trailing_metadata() or ())  # type: ignore[attr-defined]
