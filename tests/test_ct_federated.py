"""The PPPML-HMI workloads federated: 3 silos, CT volume classification and CT infection segmentation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import address

from coordinator.server import Coordinator
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState, RoundKind
from fedmeki_core.tasks.dataset import save_dataset
from fedmeki_core.tasks.synthetic import generate
from silo_agent.agent import SiloAgent
from silo_agent.cli import main as silo_main
from silo_agent.settings import SiloSettings
from silo_agent.state import AgentState
from silo_agent.trainer import LocalTrainer
from silo_agent.transport import GrpcTransport


def _agents(coordinator: Coordinator, root: Path, task: str, samples: int, image_size: int) -> list[SiloAgent]:
    agents = []
    for index in range(3):
        work_dir = root / f"silo-{index}"
        data = work_dir / f"{task}.safetensors"
        save_dataset(generate(task, samples, index, 3, seed=5, image_size=image_size), data)
        _, token = coordinator.registry.add(f"silo-{index}")
        assert (
            silo_main(["enroll", "--coordinator", address(coordinator), "--token", token, "--work-dir", str(work_dir)])
            == 0
        )
        settings = SiloSettings(
            coordinator=address(coordinator), work_dir=work_dir, device="cpu", data={task: data}, poll_wait_seconds=0.2
        )
        state = AgentState(work_dir)
        enrollment = state.enrollment()
        assert enrollment is not None
        transport = GrpcTransport(settings.coordinator, enrollment.credential)
        agents.append(SiloAgent(settings, transport, state, LocalTrainer.from_settings(settings)))
    return agents


@pytest.mark.parametrize(
    ("task", "architecture", "metric", "samples", "learning_rate", "chance"),
    [
        ("ct-covid", "ct-classifier", "eval_accuracy", 160, 1e-3, 0.6),
        ("ct-infection-segmentation", "unet", "eval_dice", 96, 3e-3, 0.0),
    ],
)
def test_a_short_federated_run_beats_chance_and_round_zero(
    sqlite_coordinator: Coordinator,
    tmp_path: Path,
    task: str,
    architecture: str,
    metric: str,
    samples: int,
    learning_rate: float,
    chance: float,
) -> None:
    agents = _agents(sqlite_coordinator, tmp_path, task, samples, image_size=32)
    spec = parse_job_spec(
        {
            "name": f"{task}-fedavg",
            "task": task,
            "rounds": 5,
            "min_silos": 3,
            "model": {"architecture": architecture},
            "algorithm": {"local_epochs": 3, "batch_size": 8, "learning_rate": learning_rate},
        }
    )
    with FedmekiClient(address(sqlite_coordinator)) as client:
        job = client.submit_job(spec)
        give_up = time.monotonic() + 600
        while not (status := client.get_job(job.id)).state.finished and time.monotonic() < give_up:
            for agent in agents:
                agent.run_once()
    assert status.state == JobState.COMPLETED, status.reason
    round_zero = status.rounds[0].metrics[metric]  # round 1's silos score checkpoint 0 before training
    final = next(r for r in status.rounds if r.kind == RoundKind.EVALUATE).metrics[metric]
    print(f"{task}: {metric} round 0 {round_zero:.3f} -> final {final:.3f}")  # for the record (pytest -s)
    assert final > max(round_zero, chance) + 0.1, (round_zero, final)
