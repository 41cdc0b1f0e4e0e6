"""`fedmeki job report` on a real job: each silo's results of each round as the coordinator recorded them, the
per-round table, its CSV and JSON exports and the learning-curve plot."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import coordinator_settings
from in_process import in_process_agents, run_job
from sqlalchemy import select

from coordinator.server import Coordinator
from coordinator.store.models import Silo, Update
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState, JobStatus

SILOS = ("silo-0", "silo-1", "silo-2")
Recorded = dict[tuple[int, str], tuple[int, dict[str, float]]]  # (round, silo) -> (samples, metrics)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[JobStatus, Recorded]]:
    """A synthetic-vitals job of 2 rounds on 3 silos, and the updates its coordinator stored."""
    root = tmp_path_factory.mktemp("report")
    coordinator = Coordinator(coordinator_settings(root / "coordinator"))
    coordinator.start()
    try:
        agents = in_process_agents(coordinator, root, "synthetic-vitals", 90)
        spec = {"name": "curves", "task": "synthetic-vitals", "rounds": 2, "min_silos": 3}
        status = run_job(coordinator, agents, parse_job_spec(spec))
        with coordinator.database.read() as session:
            rows = session.execute(
                select(Update.round_number, Silo.name, Update.num_samples, Update.metrics)
                .join(Silo, Silo.id == Update.silo_id)
                .where(Update.job_id == status.id)
            ).all()
        yield status, {(row[0], row[1]): (row[2], dict(row[3])) for row in rows}
    finally:
        coordinator.stop(grace=0)


def test_the_status_carries_each_silos_results(finished: tuple[JobStatus, Recorded]) -> None:
    status, recorded = finished
    assert status.state == JobState.COMPLETED, status.reason
    assert len(status.rounds) == 3  # 2 training rounds, then the final evaluation
    for summary in status.rounds:
        assert tuple(r.silo for r in summary.silo_results) == SILOS == summary.reported_silos
        for result in summary.silo_results:
            assert (result.num_samples, result.metrics) == recorded[(summary.number, result.silo)]
            assert "eval_accuracy" in result.metrics
