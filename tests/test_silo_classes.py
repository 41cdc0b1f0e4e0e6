"""A task whose classes each hospital defines: a shared encoder, and at every silo a head sized to its own classes."""

from __future__ import annotations

from pathlib import Path

import pytest
from in_process import in_process_agents, run_job
from safetensors.torch import load_file

from coordinator.server import Coordinator
from fedmeki_core.errors import InvalidJobSpecError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.build import build_job_model, initial_tensors
from fedmeki_core.records import JobState, RoundKind
from fedmeki_core.tasks.synthetic import generate
from fedmeki_core.tasks.synthetic_xray import local_classes

TASK = "xray-local-findings"


def _spec(personal: list[str]) -> dict[str, object]:
    return {
        "name": "local-classes",
        "task": TASK,
        "rounds": 3,
        "min_silos": 3,
        "model": {"architecture": "fedmeki-encoders-tiny"},
        "algorithm": {"local_epochs": 2, "batch_size": 32, "learning_rate": 3e-3, "personal": personal},
    }


def test_each_silo_labels_its_own_classes() -> None:
    for silo in range(3):
        labels = generate(TASK, 200, silo, 3, image_size=32).labels
        assert sorted(set(labels.tolist())) == list(range(local_classes(silo)))


def test_a_shared_head_is_refused_at_submission() -> None:
    spec = parse_job_spec(_spec([]))
    with pytest.raises(InvalidJobSpecError, match="must stay at the silos"):
        initial_tensors(spec, build_job_model(spec))


def test_silos_train_a_shared_encoder_with_heads_of_their_own_size(
    sqlite_coordinator: Coordinator, tmp_path: Path
) -> None:
    agents = in_process_agents(sqlite_coordinator, tmp_path, TASK, 240, image_size=32)
    status = run_job(sqlite_coordinator, agents, parse_job_spec(_spec(["heads.*"])))
    assert status.state == JobState.COMPLETED, status.reason
    for silo in range(3):
        state_file = next((tmp_path / f"silo-{silo}" / "jobs" / status.id).glob("client-state-*.safetensors"))
        head = load_file(str(state_file))[f"personal/heads.{TASK}.weight"]
        assert head.shape[0] == local_classes(silo)
    first = status.rounds[0].metrics["eval_accuracy"]
    final = next(r for r in status.rounds if r.kind == RoundKind.EVALUATE).metrics["eval_accuracy"]
    print(f"{TASK}: accuracy round 0 {first:.3f} -> final {final:.3f}")  # for the record (pytest -s)
    assert final > first + 0.1
