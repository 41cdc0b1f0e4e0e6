"""Real silo agents in the test's own process, stepped by the test (`agent.run_once()`), on generated data."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from conftest import address

from coordinator.server import Coordinator
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.records import JobStatus
from fedmeki_core.tasks.dataset import save_dataset
from fedmeki_core.tasks.synthetic import generate
from silo_agent.agent import SiloAgent
from silo_agent.cli import main as silo_main
from silo_agent.settings import SiloSettings
from silo_agent.state import AgentState
from silo_agent.trainer import LocalTrainer
from silo_agent.transport import GrpcTransport


def in_process_agents(
    coordinator: Coordinator,
    root: Path,
    task: str,
    samples: int,
    image_size: int | None = None,
    silos: int = 3,
    transport: Callable[[int, str, str], GrpcTransport] = lambda index, address, credential: GrpcTransport(
        address, credential
    ),
    settings: dict[str, object] | None = None,
    data_files: Sequence[Path] = (),
) -> list[SiloAgent]:
    """`silos` enrolled agents at root/silo-<i>, each with its own non-IID share of a task's synthetic data, or
    with `data_files[i]` when given (one per silo; `samples` is then unused).

    `transport(i, address, credential)` makes silo i's transport (a test's compromised silo brings its own);
    `settings` adds to each agent's SiloSettings."""
    agents = []
    for index in range(silos):
        work_dir = root / f"silo-{index}"
        data = data_files[index] if data_files else work_dir / f"{task}.safetensors"
        if not data_files:
            save_dataset(generate(task, samples, index, silos, seed=5, image_size=image_size), data)
        _, token = coordinator.registry.add(f"silo-{index}")
        assert (
            silo_main(["enroll", "--coordinator", address(coordinator), "--token", token, "--work-dir", str(work_dir)])
            == 0
        )
        values: dict[str, object] = {
            "coordinator": address(coordinator),
            "work_dir": work_dir,
            "device": "cpu",
            "data": {task: data},
            "poll_wait_seconds": 0.2,
            **(settings or {}),
        }
        agent_settings = SiloSettings(**values)  # type: ignore[arg-type]
        state = AgentState(work_dir)
        enrollment = state.enrollment()
        assert enrollment is not None
        calls = transport(index, agent_settings.coordinator, enrollment.credential)
        agents.append(SiloAgent(agent_settings, calls, state, LocalTrainer.from_settings(agent_settings)))
    return agents


def run_job(
    coordinator: Coordinator,
    agents: Sequence[SiloAgent],
    spec: JobSpec,
    timeout: float = 600,
    ckks_public_context: Path | None = None,
) -> JobStatus:
    """Submit `spec` (with a CKKS job's public context) and step the agents until the job ends (or `timeout`
    seconds pass)."""
    with FedmekiClient(address(coordinator)) as client:
        job = client.submit_job(spec, ckks_public_context=ckks_public_context)
        give_up = time.monotonic() + timeout
        while not (status := client.get_job(job.id)).state.finished and time.monotonic() < give_up:
            for agent in agents:
                agent.run_once()
    return status
