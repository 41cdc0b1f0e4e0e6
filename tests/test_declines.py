"""Issue 14's reproduction: bad jobs and an honest one on the same silos (real coordinator, real agent processes).

A job whose initial weights do not fit its model (a renamed tensor) and a job whose model does not fit the silo's
memory used to hold every silo they selected: the coordinator handed the oldest job's round until an update came,
the silos failed it at every poll, and the honest job behind them failed with "0 updates before the deadline".
Now each silo gives a bad round up (at once when it would fail the same way again, after `max_task_failures`
attempts otherwise), declines it with the reason, and the job fails naming the silo and the cause; the honest job
is handed out between them and completes with the FedAvg of its updates.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from sqlalchemy import select

from coordinator.server import Coordinator
from coordinator.store.models import Update
from fedmeki_core import convert_spec
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState
from tests.agents import (
    AGENTS_SEEN_SECONDS,
    TASK,
    AgentProcess,
    describe_job,
    prepare_agent,
    recompute_round,
    wait_until,
)
from tests.conftest import address, coordinator_settings
from tests.silo_wire import job_spec, submit_raw, weights_bytes

ATTEMPTS = 2  # the silos' max_task_failures
SILO_MEMORY = 3 << 30  # each agent's address space: the big job's 1.3-billion-parameter model cannot fit


@pytest.fixture
def keeping_coordinator(tmp_path: Path, database_url: str) -> Iterator[Coordinator]:
    """A coordinator that keeps spooled updates, so the test can recompute the honest job's round by hand."""
    instance = Coordinator(coordinator_settings(tmp_path / "coordinator", database_url, keep_updates=True))
    instance.start()
    yield instance
    instance.stop(grace=0)


def _spec(name: str, **fields: object) -> dict[str, object]:
    return {"name": name, "task": TASK, "rounds": 1, "min_silos": 2, "round_deadline_seconds": 600, "seed": 3, **fields}


def test_bad_jobs_are_declined_with_their_cause_and_an_honest_job_on_the_same_silos_completes(
    keeping_coordinator: Coordinator, tmp_path: Path
) -> None:
    coordinator = keeping_coordinator
    target = address(coordinator)
    agents: list[AgentProcess] = []
    for index in range(2):
        _, token = coordinator.registry.add(f"silo-{index}")
        extra = {"max_task_failures": ATTEMPTS}
        agents.append(prepare_agent(target, token, tmp_path / f"silo-{index}", index, 2, 120, extra=extra))
    logs = lambda: "\n".join(a.output()[-3000:] for a in agents)  # noqa: E731
    try:
        for agent in agents:
            agent.start(address_space_bytes=SILO_MEMORY)
        wait_until(
            lambda: len([s for s in coordinator.registry.list() if s.last_seen_at]) == 2, AGENTS_SEEN_SECONDS, logs
        )
        # Submitted raw: the researcher's own client would refuse the first and allocate the second.
        renamed = submit_raw(target, job_spec(name="renamed", min_silos=2, round_deadline_seconds=600), weights_bytes())
        huge = {
            "architecture": "tiny-transformer",
            "config": {"hidden_size": 8192, "intermediate_size": 65536, "num_layers": 1},
        }
        too_big = submit_raw(
            target, convert_spec.job_spec_to_proto(parse_job_spec(_spec("too-big", model=huge))), weights_bytes(1)
        )
        with FedmekiClient(target) as client:
            honest = client.submit_job(parse_job_spec(_spec("honest")))
            jobs = (renamed.id, too_big.id, honest.id)
            wait_until(
                lambda: all(client.get_job(job_id).state.finished for job_id in jobs),
                240,
                lambda: "\n".join(describe_job(client.get_job(job_id)) for job_id in jobs) + "\n" + logs(),
            )
            renamed_status, too_big_status, honest_status = (client.get_job(job_id) for job_id in jobs)
    finally:
        for agent in agents:
            agent.stop()

    assert honest_status.state == JobState.COMPLETED, describe_job(honest_status)
    assert renamed_status.state == JobState.FAILED and too_big_status.state == JobState.FAILED
    assert re.fullmatch(
        r"silo 'silo-[01]' aborted round 1: the job's checkpoint does not match its model: tensor '[\w.]+' of "
        r"tiny-transformer is missing",
        renamed_status.reason,
    ), renamed_status.reason
    assert re.match(r"silo 'silo-[01]' aborted round 1: ", too_big_status.reason), too_big_status.reason
    # The silo's resource budget declines it before anything is downloaded or allocated.
    assert "over this silo's max_parameters" in too_big_status.reason, too_big_status.reason

    # No silo spun: each tried a bad round at most its bound of times.
    for agent in agents:
        output = agent.output()
        assert output.count(f"job {renamed.id} round 1: downloaded") <= 1, output
        assert output.count(f"job {too_big.id} round 1: downloaded") <= 1, output
        assert len(re.findall(f"job {too_big.id} round 1: attempt \\d of {ATTEMPTS} failed", output)) < ATTEMPTS

    artifacts = coordinator.artifacts
    with coordinator.database.read() as session:
        query = select(Update).where(Update.job_id == honest.id, Update.round_number == 1)
        updates = session.scalars(query).all()
    assert len(updates) == 2
    expected = recompute_round(
        artifacts.checkpoint_path(honest.id, 0), [(artifacts.absolute(u.path), u.num_samples) for u in updates]
    )
    actual = load_file(str(artifacts.checkpoint_path(honest.id, 1)))
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
