"""Dropout: silos SIGKILLed mid-upload (fedmeki_core/faults.py) and never restarted. With `min_silos` survivors the
round closes at its deadline with exactly the FedAvg of the survivors' updates; with fewer, nothing is committed and
the job fails (the policy: a training round short of `min_silos` at its deadline fails the job, no retry).

Real processes: a coordinator and six silo agents, `min_silos` 4, one training round, each case waiting out a real
deadline; so `slow`. The normal run proves the same rule in-process with a fake clock and cancelled streams
(tests/test_scheduler.py, `test_dropout_mid_upload_closes_at_the_deadline_with_exactly_the_survivors`).
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from sqlalchemy import func, select

from coordinator.store.database import Database
from coordinator.store.models import Checkpoint, Round, Silo, Update
from fedmeki_core.app.demo import add_silo
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import UnavailableError
from fedmeki_core.faults import CRASH_AT_ENV
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState, RoundState
from tests.agents import (
    TASK,
    AgentProcess,
    describe_job,
    prepare_agent,
    recompute_round,
    serve_coordinator,
    stop_coordinator,
    wait_until,
)

SILOS = 6
MIN_SILOS = 4
DEADLINE_SECONDS = 30  # ample for the survivors to train and upload; the round waits this long for the killed ones
CHUNK_BYTES = 4096


def _polled(db: Database) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(Silo).where(Silo.last_seen_at.is_not(None))) or 0


@pytest.mark.slow
@pytest.mark.parametrize("killed", [2, 3])
def test_silos_killed_mid_upload_close_the_round_at_its_deadline_or_fail_the_job(killed: int, tmp_path: Path) -> None:
    data_dir, log, url = tmp_path / "coordinator", tmp_path / "coordinator.log", f"sqlite:///{tmp_path / 'c.db'}"
    environment = {"FEDMEKI_COORDINATOR_KEEP_UPDATES": "true", "FEDMEKI_COORDINATOR_TICK_SECONDS": "0.1"}
    coordinator, address = serve_coordinator(data_dir, url, "127.0.0.1:0", log, environment)
    database = Database(url)
    agents: list[AgentProcess] = []
    try:
        for index in range(SILOS):
            token = add_silo(f"silo-{index}", "--db", url, "--data-dir", str(data_dir))
            extra = {"chunk_bytes": CHUNK_BYTES}
            agents.append(prepare_agent(address, token, tmp_path / f"silo-{index}", index, SILOS, 120, extra=extra))
        for index, agent in enumerate(agents):  # the first `killed` die after their delta's second chunk
            agent.start({CRASH_AT_ENV: "silo.mid_upload@2"} if index < killed else None)
        # Every silo polls before the job is submitted, so the round selects all six, not the first four.
        wait_until(lambda: _polled(database) == SILOS, 120, lambda: "\n".join(a.output()[-2000:] for a in agents))
        spec = parse_job_spec(
            {
                "name": "dropout",
                "task": TASK,
                "rounds": 1,
                "min_silos": MIN_SILOS,
                "round_deadline_seconds": DEADLINE_SECONDS,
                "algorithm": {"learning_rate": 0.003},
            }
        )
        with FedmekiClient(address) as client:
            job = client.submit_job(spec)

            def round_closed() -> bool:
                try:
                    status = client.get_job(job.id)
                except UnavailableError:
                    return False
                return status.state.finished or status.current_round >= 1

            wait_until(round_closed, 180, lambda: describe_job(client.get_job(job.id)) + log.read_text()[-3000:])
            status = client.get_job(job.id)
        for agent in agents[:killed]:
            assert agent.process is not None
            assert agent.process.wait(timeout=30) == -signal.SIGKILL, agent.output()[-3000:]
    finally:
        for agent in agents:
            agent.stop()
        stop_coordinator(coordinator)
    with database.read() as session:
        names = {silo.id: silo.name for silo in session.scalars(select(Silo))}
        (round_row,) = session.scalars(select(Round).where(Round.job_id == job.id, Round.number == 1))
        selected, round_state = len(round_row.selected), round_row.state
        updates = [
            (names[row.silo_id], data_dir / row.path, row.num_samples)
            for row in session.scalars(select(Update).where(Update.job_id == job.id, Update.round_number == 1))
        ]
        checkpoints = sorted(session.scalars(select(Checkpoint.round_number).where(Checkpoint.job_id == job.id)))
    database.dispose()
    assert selected == SILOS
    survivors = {f"silo-{index}" for index in range(killed, SILOS)}
    assert {name for name, _, _ in updates} == survivors  # each once (the table's unique key too)
    assert len(updates) == len(survivors)
    # The killed uploads' held bytes went when the round closed, committed or failed.
    assert not [p for p in (data_dir / "incoming").rglob("*") if p.is_file()], "a killed upload left bytes behind"
    if len(survivors) < MIN_SILOS:
        assert status.state == JobState.FAILED, describe_job(status)
        assert round_state == RoundState.FAILED.value
        assert f"{len(survivors)} updates before the deadline, min_silos is {MIN_SILOS}" in status.reason
        assert checkpoints == [0]
        return
    assert round_state == RoundState.COMMITTED.value, describe_job(status)
    assert checkpoints == [0, 1]
    checkpoint_dir = data_dir / "checkpoints" / job.id
    expected = recompute_round(
        checkpoint_dir / "round-00000.safetensors",
        [(path, samples) for _, path, samples in updates],
    )
    actual = load_file(str(checkpoint_dir / "round-00001.safetensors"))
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    initial = load_file(str(checkpoint_dir / "round-00000.safetensors"))
    assert any(not np.array_equal(actual[name], initial[name]) for name in actual)  # the round did move the model
