"""ListJobs answers in pages that neither skip nor repeat jobs, and no row a silo filled can make GetJob or ListJobs
too big to answer."""

from __future__ import annotations

import time

import grpc
import pytest
from safetensors.numpy import save
from sqlalchemy import update

from coordinator.server import Coordinator
from coordinator.store.models import Update
from coordinator.store.views import MAX_METRIC_NAME, MAX_METRICS_SHOWN
from fedmeki_core.client import FedmekiClient
from fedmeki_core.proto.v1 import jobs_pb2, jobs_pb2_grpc
from fedmeki_core.records import JobState
from tests.conftest import address, enroll
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes


def _list(coordinator: Coordinator, **fields: object) -> jobs_pb2.ListJobsResponse:
    with grpc.insecure_channel(address(coordinator)) as channel:
        return jobs_pb2_grpc.JobServiceStub(channel).ListJobs(jobs_pb2.ListJobsRequest(**fields))  # type: ignore[arg-type]


def test_list_jobs_pages_neither_skip_nor_repeat(coordinator: Coordinator) -> None:
    enroll(coordinator, "a")
    submitted = [submit_raw(address(coordinator), job_spec(name=f"job-{i}"), weights_bytes()).id for i in range(7)]
    first = _list(coordinator, page_size=3)
    assert [job.id for job in first.jobs] == submitted[:3] and first.next_page_token
    late = submit_raw(address(coordinator), job_spec(name="late"), weights_bytes()).id  # arrives between pages
    second = _list(coordinator, page_size=3, page_token=first.next_page_token)
    assert [job.id for job in second.jobs] == submitted[3:6]
    third = _list(coordinator, page_size=3, page_token=second.next_page_token)
    assert [job.id for job in third.jobs] == [submitted[6], late] and not third.next_page_token
    with FedmekiClient(address(coordinator)) as client:
        assert [job.id for job in client.list_jobs(page_size=2)] == [*submitted, late]
        assert [job.id for job in client.list_jobs()] == [*submitted, late]
        assert client.list_jobs([JobState.COMPLETED], page_size=1) == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"page_size": -1}, "page_size -1 is negative"),
        ({"page_token": "not a token"}, "page_token is not one this coordinator gave"),
        ({"page_token": "MjAyNi0wMS0wMVQwMDowMDowMHwnOyBEUk9QIFRBQkxFIGpvYnM="}, "page_token is not one"),
    ],
)
def test_a_bad_page_request_is_invalid_argument(
    sqlite_coordinator: Coordinator, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _list(sqlite_coordinator, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in str(caught.value.details())


def test_a_flood_of_metric_names_in_a_row_leaves_get_job_and_list_jobs_answering(coordinator: Coordinator) -> None:
    """30,000 metric names in one update row (2 MB, over the message limit) once broke both for every researcher."""
    silo = RawSilo(address(coordinator), enroll(coordinator, "a"))
    silo.poll()
    job = submit_raw(address(coordinator), job_spec(min_silos=1, rounds=1), weights_bytes()).id
    give_up = time.monotonic() + 20
    while silo.poll() is None:
        assert time.monotonic() < give_up
    silo.upload(job, 1, save(tensors(0.5)))
    while coordinator.scheduler.status(job).current_round < 1:  # round 1 committed: its rows stay as they are
        assert time.monotonic() < give_up
        time.sleep(0.02)
    flood = {f"metric-{i:05d}-" + "x" * 200: float(i) for i in range(30_000)}
    with coordinator.database.transaction() as session:
        session.execute(update(Update).where(Update.job_id == job).values(metrics=flood))
    with FedmekiClient(address(coordinator)) as client:
        (shown,) = client.get_job(job).rounds[0].silo_results
        assert len(shown.metrics) == MAX_METRICS_SHOWN
        assert all(len(name) == MAX_METRIC_NAME for name in shown.metrics)
        assert [j.id for j in client.list_jobs()] == [job]
