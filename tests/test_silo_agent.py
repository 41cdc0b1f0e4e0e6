"""The silo agent against a real coordinator: resume after a crash, evaluation, settings, its commands."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import select

from coordinator.server import Coordinator
from coordinator.store.models import Update
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import UnavailableError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState, RoundTask
from fedmeki_core.tasks.dataset import save_dataset
from fedmeki_core.tasks.synthetic_vitals import generate
from silo_agent.agent import SiloAgent
from silo_agent.cli import main as silo_main
from silo_agent.settings import SiloSettings
from silo_agent.state import AgentState
from silo_agent.trainer import LocalTrainer
from silo_agent.transport import PLAINTEXT_ENCODING, GrpcTransport
from tests.agents import TASK, wait_until
from tests.conftest import address


class DroppedConnectionTransport(GrpcTransport):
    """The network edge failing once: the first upload dies as if the connection dropped."""

    dropped = False

    def upload(
        self,
        task: RoundTask,
        delta: Path,
        sha256: str,
        num_samples: int,
        metrics: dict[str, float],
        relay_hop: int = 0,
        encoding: str = PLAINTEXT_ENCODING,
        fresh: bool = False,
    ) -> None:
        if not self.dropped:
            self.dropped = True
            raise UnavailableError("connection reset by peer")
        super().upload(task, delta, sha256, num_samples, metrics, relay_hop, encoding, fresh)


def _offset_questions(coordinator: Coordinator) -> float:
    """UploadOffset calls the coordinator answered (its own RPC metric)."""
    value = coordinator.metrics.registry.get_sample_value(
        "fedmeki_rpc_handled_total", {"service": "fedmeki.v1.SiloService", "method": "UploadOffset", "code": "OK"}
    )
    return value or 0.0


def _settings(coordinator: Coordinator, work_dir: Path) -> SiloSettings:
    data_file = work_dir / "data.safetensors"
    save_dataset(generate(60, silo_index=0, num_silos=1, seed=2), data_file)
    return SiloSettings(
        coordinator=address(coordinator),
        work_dir=work_dir,
        device="cpu",
        data={TASK: data_file},
        poll_wait_seconds=2,
        retry_max_seconds=0.5,
    )


def _agent(
    settings: SiloSettings, transport_class: type[GrpcTransport] = GrpcTransport
) -> tuple[SiloAgent, AgentState]:
    state = AgentState(settings.work_dir)
    enrollment = state.enrollment()
    assert enrollment is not None
    transport = transport_class(settings.coordinator, enrollment.credential, retry_max_seconds=0.5)
    return SiloAgent(settings, transport, state, LocalTrainer.from_settings(settings)), state


def _enroll(coordinator: Coordinator, work_dir: Path, name: str = "hospital") -> None:
    _, token = coordinator.registry.add(name)
    assert (
        silo_main(["enroll", "--coordinator", address(coordinator), "--token", token, "--work-dir", str(work_dir)]) == 0
    )


def test_a_restarted_agent_uploads_its_recorded_delta_without_training_again(
    sqlite_coordinator: Coordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="silo_agent")
    _enroll(sqlite_coordinator, tmp_path / "silo")
    settings = _settings(sqlite_coordinator, tmp_path / "silo")
    first, state = _agent(settings, DroppedConnectionTransport)
    assert first.run_once() is None  # registers the silo's tasks; nothing to do yet
    with FedmekiClient(address(sqlite_coordinator)) as client:
        job = client.submit_job(parse_job_spec({"name": "resume", "task": TASK, "rounds": 1, "min_silos": 1}))
        with pytest.raises(UnavailableError):
            first.run_once()  # trains, then the upload dies: the agent process goes down here
        record = state.task(job.id, 1)
        assert record is not None and record.status == "trained" and record.delta is not None
        assert record.delta.path.exists()
        state.close()

        restarted, state = _agent(settings)
        restarted.run_once()
        assert state.task(job.id, 1).status == "uploaded"  # type: ignore[union-attr]
        # A restarted agent cannot know what its dead predecessor sent: it asks where to resume
        assert _offset_questions(sqlite_coordinator) == 1
        assert "resuming the upload of the recorded delta" in caplog.text
        assert caplog.text.count("trained on") == 1
        with sqlite_coordinator.database.read() as session:
            uploaded = session.scalars(select(Update).where(Update.job_id == job.id)).all()
        assert [(u.round_number, u.sha256) for u in uploaded] == [(1, record.delta.sha256)]

        restarted.run_once()  # the final evaluation round
        wait_until(lambda: client.get_job(job.id).state.finished, 30, lambda: client.get_job(job.id))
        final = client.get_job(job.id)
    assert final.state == JobState.COMPLETED
    assert state.task(job.id, 2).status == "reported"  # type: ignore[union-attr]
    state.close()


def test_a_fresh_delta_goes_up_without_asking_where_to_resume(sqlite_coordinator: Coordinator, tmp_path: Path) -> None:
    """Trained just now by this process, nothing of it can be held at the coordinator: no UploadOffset round trip."""
    _enroll(sqlite_coordinator, tmp_path / "silo")
    agent, state = _agent(_settings(sqlite_coordinator, tmp_path / "silo"))
    assert agent.run_once() is None
    with FedmekiClient(address(sqlite_coordinator)) as client:
        job = client.submit_job(parse_job_spec({"name": "fresh", "task": TASK, "rounds": 1, "min_silos": 1}))
        agent.run_once()
    assert state.task(job.id, 1).status == "uploaded"  # type: ignore[union-attr]
    assert _offset_questions(sqlite_coordinator) == 0
    with sqlite_coordinator.database.read() as session:
        assert len(session.scalars(select(Update).where(Update.job_id == job.id)).all()) == 1
    state.close()


def test_status_command_shows_enrollment_and_tasks(
    sqlite_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work_dir = tmp_path / "silo"
    assert silo_main(["status", "--work-dir", str(work_dir)]) == 0
    assert "not enrolled" in capsys.readouterr().out
    _enroll(sqlite_coordinator, work_dir, "st-anne")
    capsys.readouterr()
    assert silo_main(["status", "--work-dir", str(work_dir)]) == 0
    assert "silo st-anne" in capsys.readouterr().out
    assert (work_dir / "state.sqlite").stat().st_mode & 0o077 == 0


def test_run_refuses_to_start_unenrolled_or_misconfigured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_file = tmp_path / "data.safetensors"
    save_dataset(generate(10, 0, 1), data_file)
    config = tmp_path / "silo.yaml"
    config.write_text(f"coordinator: 127.0.0.1:1\nwork_dir: {tmp_path / 'w'}\ndata: {{{TASK}: {data_file}}}\n")
    assert silo_main(["run", "--config", str(config)]) == 2
    assert "not enrolled: run `fedmeki-silo enroll" in capsys.readouterr().err
    assert silo_main(["run", "--config", str(config), "--device", "tpu"]) == 2
    assert "device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    config.write_text(f"work_dir: {tmp_path / 'w'}\ndata: {{nope: {data_file}}}\n")
    assert silo_main(["run", "--config", str(config)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
