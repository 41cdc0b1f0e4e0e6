"""A coordinator killed with SIGKILL between rounds resumes the job from its database and finishes it."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from sqlalchemy import select

from coordinator.store.database import Database
from coordinator.store.models import Update
from fedmeki_core.app.demo import add_silo
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import UnavailableError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState
from tests.agents import TASK, describe_job, prepare_agent, serve_coordinator, stop_coordinator, wait_until


def _current_round(client: FedmekiClient, job_id: str) -> int:
    """The job's round, or -1 while the coordinator cannot be reached (the client reconnects with backoff)."""
    try:
        return client.get_job(job_id).current_round
    except UnavailableError:
        return -1


def _finished(client: FedmekiClient, job_id: str) -> bool:
    try:
        return client.get_job(job_id).state.finished
    except UnavailableError:
        return False


def test_sigkill_between_rounds_then_restart_finishes_the_job(tmp_path: Path) -> None:
    data_dir, log = tmp_path / "coordinator", tmp_path / "coordinator.log"
    db = f"sqlite:///{tmp_path / 'coordinator.db'}"
    process, address = serve_coordinator(data_dir, db, "127.0.0.1:0", log)
    agents = []
    try:
        for index in range(2):
            token = add_silo(f"silo-{index}", "--db", db, "--data-dir", str(data_dir))
            agents.append(prepare_agent(address, token, tmp_path / f"silo-{index}", index, 2, 120))
        for agent in agents:
            agent.start()
        spec = parse_job_spec(
            {
                "name": "survives",
                "task": TASK,
                "rounds": 3,
                "min_silos": 2,
                "round_deadline_seconds": 120,
                "algorithm": {"learning_rate": 0.003},
            }
        )
        with FedmekiClient(address) as client:
            job = client.submit_job(spec)
            wait_until(lambda: _current_round(client, job.id) >= 1, 120, lambda: describe_job(client.get_job(job.id)))
            process.send_signal(signal.SIGKILL)
            process.wait()
            assert process.stdout is not None
            process.stdout.close()
            killed_at = _current_round(client, job.id)
            assert killed_at == -1
            process, _ = serve_coordinator(data_dir, db, address, log)
            wait_until(
                lambda: _finished(client, job.id),
                180,
                lambda: describe_job(client.get_job(job.id)) + "\n".join(a.output()[-3000:] for a in agents),
            )
            final = client.get_job(job.id)
        assert final.state == JobState.COMPLETED, describe_job(final)
        assert [r.number for r in final.rounds] == [1, 2, 3, 4]
    finally:
        for agent in agents:
            agent.stop()
        stop_coordinator(process)
    database = Database(db)
    with database.read() as session:
        updates = session.scalars(select(Update).where(Update.job_id == job.id)).all()
    database.dispose()
    assert sorted((u.round_number, u.silo_id) for u in updates if u.round_number <= 3) == sorted(
        (r, s) for r in (1, 2, 3) for s in {u.silo_id for u in updates}
    )
    final_checkpoint = load_file(str(data_dir / "checkpoints" / job.id / "round-00003.safetensors"))
    assert all(np.isfinite(v).all() for v in final_checkpoint.values())


def test_sigterm_stops_the_coordinator_gracefully(tmp_path: Path) -> None:
    log = tmp_path / "coordinator.log"
    process, address = serve_coordinator(tmp_path / "data", f"sqlite:///{tmp_path / 'c.db'}", "127.0.0.1:0", log)
    with FedmekiClient(address) as client:
        assert client.list_jobs() == []
    assert stop_coordinator(process) == 0
    assert "stopping gracefully" in log.read_text()
