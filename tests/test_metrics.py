"""Prometheus metrics: the coordinator's and an agent's real HTTP endpoints, scraped after a small real job."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from conftest import address, coordinator_settings
from in_process import in_process_agents, run_job
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from coordinator.server import Coordinator
from coordinator.store.models import Checkpoint, Update
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import NotFoundError, UnavailableError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.metrics_endpoint import MetricsEndpoint
from fedmeki_core.records import JobState

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_until_counted(port: int, name: str, **labels: str) -> Samples:
    """Scrapes until the sample is there: `context.abort` sends its status to the client before the handler's
    stack (and the interceptor's count) unwinds, so a client can see NOT_FOUND a moment before the counter does."""
    deadline = time.monotonic() + 10
    samples = scrape(port)
    while value(samples, name, **labels) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(port)
    return samples


@pytest.fixture
def observed_coordinator(tmp_path: Path):  # type: ignore[no-untyped-def]
    instance = Coordinator(coordinator_settings(tmp_path / "coordinator", metrics_address="127.0.0.1:0"))
    instance.start()
    yield instance
    instance.stop(grace=0)


def test_metrics_endpoints_after_a_job(observed_coordinator: Coordinator, tmp_path: Path) -> None:
    coordinator = observed_coordinator
    assert coordinator.metrics_port is not None
    agents = in_process_agents(coordinator, tmp_path, "synthetic-vitals", 60)
    spec = parse_job_spec(
        {
            "name": "observed",
            "task": "synthetic-vitals",
            "rounds": 2,
            "min_silos": 3,
            "algorithm": {"local_epochs": 2, "batch_size": 16, "learning_rate": 0.05},
        }
    )
    status = run_job(coordinator, agents, spec)
    assert status.state == JobState.COMPLETED, status.reason
    with FedmekiClient(address(coordinator)) as client, pytest.raises(NotFoundError):
        client.get_job("no-such-job")

    silo_service, job_service = "fedmeki.v1.SiloService", "fedmeki.v1.JobService"
    not_found = {"service": job_service, "method": "GetJob", "code": "NOT_FOUND"}
    samples = scrape_until_counted(coordinator.metrics_port, "fedmeki_rpc_handled_total", **not_found)
    assert value(samples, "fedmeki_jobs", state="completed") == 1
    assert value(samples, "fedmeki_jobs", state="running") == 0
    assert value(samples, "fedmeki_rounds", state="committed") == 3  # two training rounds and the evaluation
    assert value(samples, "fedmeki_silos_registered", role="trainer") == 3
    assert value(samples, "fedmeki_silos_connected", role="trainer") == 3
    assert len([key for key in samples if key[0] == "fedmeki_silo_last_seen_timestamp_seconds"]) == 3
    assert value(samples, "fedmeki_aggregation_seconds_count") == 2
    assert value(samples, "fedmeki_aggregation_seconds_sum") > 0
    assert value(samples, "fedmeki_rpc_handled_total", service=silo_service, method="UploadUpdate", code="OK") == 6
    assert value(samples, "fedmeki_rpc_handled_total", service=silo_service, method="DownloadModel", code="OK") == 9
    assert value(samples, "fedmeki_rpc_handled_total", **not_found) == 1
    assert value(samples, "fedmeki_transfer_seconds_count", method="UploadUpdate") == 6
    with coordinator.database.read() as session:
        uploaded = session.scalar(select(func.sum(Update.size_bytes)))
        checkpoints = dict(session.execute(select(Checkpoint.round_number, Checkpoint.size_bytes)).all())
    assert value(samples, "fedmeki_transfer_bytes_total", method="UploadUpdate", direction="upload") == uploaded
    assert value(samples, "fedmeki_transfer_bytes_total", method="SubmitJob", direction="upload") == checkpoints[0]
    downloaded = 3 * sum(checkpoints[r] for r in (0, 1, 2))  # each silo fetched checkpoints 0 and 1, then 2 to score
    assert value(samples, "fedmeki_transfer_bytes_total", method="DownloadModel", direction="download") == downloaded

    agent = agents[0]
    endpoint = MetricsEndpoint(agent.metrics.registry, "127.0.0.1:0")
    port = endpoint.start()
    try:
        silo = scrape(port)
    finally:
        endpoint.stop()
    assert value(silo, "fedmeki_silo_device_info", device="cpu") == 1
    trained = 48 * 2 * 2  # 48 training samples (60 less the 20% held out), two epochs, two rounds
    assert value(silo, "fedmeki_silo_trained_samples_total") == trained
    assert value(silo, "fedmeki_silo_training_seconds_count") == 2
    assert value(silo, "fedmeki_silo_training_samples_per_second") > 0
    steps_timed = 2 * (2 * 3 - 1)  # per round: 3 batches of 16 a epoch, two epochs; a round's first step is not
    assert value(silo, "fedmeki_silo_training_step_seconds_count") == steps_timed


def test_a_metrics_port_in_use_is_a_clear_error_and_starts_nothing(tmp_path: Path) -> None:
    first = Coordinator(coordinator_settings(tmp_path / "first", metrics_address="127.0.0.1:0"))
    first.start()
    try:
        taken = first.metrics_port
        second = Coordinator(coordinator_settings(tmp_path / "second", metrics_address=f"127.0.0.1:{taken}"))
        with pytest.raises(UnavailableError, match=rf"cannot listen on 127.0.0.1:{taken} \(metrics_address\)"):
            second.start()
        assert second.port == 0  # neither the gRPC server nor the scheduler was started
    finally:
        first.stop(grace=0)
