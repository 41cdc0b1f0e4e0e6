"""The silo agent's workload per task (silo_agent/workloads.py): chosen once from the task's kind and its job's spec,
it answers what the agent used to branch on: what the task does with its model, what it may ask of the silo's
resources, and how its update is noised for the privacy budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import CheckpointInfo, RoundKind, RoundTask
from fedmeki_core.statistics import noise_multiplier
from fedmeki_core.wire import TensorSpec
from silo_agent.injector import Injector
from silo_agent.job_state import JobStateStore
from silo_agent.modes import SiloMode
from silo_agent.privacy_budget import Release
from silo_agent.resources import ResourceBudget
from silo_agent.statistics import StatisticsRelease
from silo_agent.trainer import LocalTrainer
from silo_agent.transport import GrpcTransport
from silo_agent.workloads import InjectionWorkload, ModelWorkload, StatisticsWorkload, Workload, task_workload

TRAINING: dict[str, Any] = {"name": "j", "task": "synthetic-vitals", "rounds": 2}
STATISTICS: dict[str, Any] = {"name": "s", "task": "tabular", "statistics": {"features": ["age", "lactate"]}}
BOUNDS = {"age": [0, 120], "lactate": [0, 20]}
LOCAL_DP = {"privacy": {"dp": {"mode": "local", "clip_norm": 1.0, "noise_multiplier": 0.8}}}
GAUSSIAN = {"mechanism": "gaussian", "epsilon": 2.0, "bounds": BOUNDS}
LAPLACE = {"mechanism": "laplace", "epsilon": 2.0, "bounds": BOUNDS}
LAPLACE_NOISE = "statistics job job-1 adds Laplace noise"


def _task(job: dict[str, Any], kind: RoundKind = RoundKind.TRAIN) -> RoundTask:
    manifest = [TensorSpec("w", "F32", (4,))]  # 16 bytes
    checkpoint = CheckpointInfo("job-1", 0, 16, "0" * 64)
    return RoundTask("job-1", 1, kind, parse_job_spec(job), checkpoint, manifest, deadline_seconds=60)


def _workload(task: RoundTask, tmp_path: Path, max_checkpoint_bytes: int = 1 << 30) -> Workload:
    trainer = LocalTrainer(torch.device("cpu"), {}, 0.2)  # nothing runs: choosing a workload does no work
    resources = ResourceBudget(10**9, max_checkpoint_bytes, 1 << 40)
    mode = SiloMode(GrpcTransport("127.0.0.1:1"))  # never called: choosing a workload does no I/O
    release, injector = StatisticsRelease({}, 5), Injector(trainer, tmp_path)
    return task_workload(task, mode, trainer, trainer, release, injector, resources)


def _statistics(dp: dict[str, Any] | None) -> dict[str, Any]:
    return {**STATISTICS, "statistics": {**STATISTICS["statistics"], "dp": dp}}


@pytest.mark.parametrize(
    ("job", "kind", "expected", "release"),
    [
        (TRAINING, RoundKind.TRAIN, ModelWorkload, Release()),
        ({**TRAINING, **LOCAL_DP}, RoundKind.TRAIN, ModelWorkload, Release("local", 0.8)),
        ({**TRAINING, **LOCAL_DP}, RoundKind.EVALUATE, ModelWorkload, Release("local", 0.8)),
        (STATISTICS, RoundKind.TRAIN, StatisticsWorkload, Release()),
        (_statistics(LAPLACE), RoundKind.TRAIN, StatisticsWorkload, Release(unaccounted=LAPLACE_NOISE)),
        (TRAINING, RoundKind.INJECT, InjectionWorkload, Release()),
    ],
)
def test_the_workload_follows_the_tasks_kind_and_its_jobs_spec(
    job: dict[str, Any], kind: RoundKind, expected: type, release: Release, tmp_path: Path
) -> None:
    task = _task(job, kind)
    workload = _workload(task, tmp_path)
    assert type(workload) is expected
    assert workload.release(task) == release


def test_a_statistics_jobs_gaussian_noise_is_charged_at_its_noise_multiplier(tmp_path: Path) -> None:
    task = _task(_statistics(GAUSSIAN))
    assert task.spec.statistics is not None and task.spec.statistics.dp is not None
    assert _workload(task, tmp_path).release(task) == Release("statistics", noise_multiplier(task.spec.statistics.dp))


@pytest.mark.parametrize(
    ("job", "kind", "refused"),
    [(TRAINING, RoundKind.TRAIN, True), (STATISTICS, RoundKind.TRAIN, True), (TRAINING, RoundKind.INJECT, False)],
)
def test_a_checkpoint_over_the_budget_is_refused_except_for_an_injection(
    job: dict[str, Any], kind: RoundKind, refused: bool, tmp_path: Path
) -> None:
    task = _task(job, kind)
    reason = _workload(task, tmp_path, max_checkpoint_bytes=8).resource_refusal(task)
    assert (reason is not None) == refused
    assert reason is None or "over this silo's max_checkpoint_bytes" in reason


def test_an_injection_task_is_never_trained(tmp_path: Path) -> None:
    task = _task(TRAINING, RoundKind.INJECT)
    with pytest.raises(InvalidInputError, match="an injection task uploads no update"):
        _workload(task, tmp_path).train(task, tmp_path / "c", tmp_path / "d", tmp_path / "s", JobStateStore(tmp_path))
