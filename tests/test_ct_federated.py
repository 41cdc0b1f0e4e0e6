"""The PPPML-HMI workloads federated: 3 silos, CT volume classification and CT infection segmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
from in_process import in_process_agents, run_job

from coordinator.server import Coordinator
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState, RoundKind


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
    agents = in_process_agents(sqlite_coordinator, tmp_path, task, samples, image_size=32)
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
    status = run_job(sqlite_coordinator, agents, spec)
    assert status.state == JobState.COMPLETED, status.reason
    round_zero = status.rounds[0].metrics[metric]  # round 1's silos score checkpoint 0 before training
    final = next(r for r in status.rounds if r.kind == RoundKind.EVALUATE).metrics[metric]
    print(f"{task}: {metric} round 0 {round_zero:.3f} -> final {final:.3f}")  # for the record (pytest -s)
    assert final > max(round_zero, chance) + 0.1, (round_zero, final)
