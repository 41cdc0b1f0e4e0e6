"""What a task makes of its global model at this silo, one strategy per task, chosen once from its kind and its
job's spec: a model trained and scored (the default), a statistics job's release (no model: nothing to score), or
the injection stage (run by an injector silo on the model's encoders).

The counterpart of `silo_agent/modes.py` (how the models travel); the agent asks a task's workload and never
branches on the task's kind or on its job being a statistics job. The collaborators are passed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.records import RoundKind, RoundTask
from fedmeki_core.statistics import noise_multiplier
from silo_agent.distributed import Injection, Training
from silo_agent.job_state import JobStateStore
from silo_agent.modes import SiloMode
from silo_agent.privacy_budget import Release
from silo_agent.resources import ResourceBudget
from silo_agent.statistics import StatisticsRelease
from silo_agent.trainer import LocalTrainer, TrainingResult

Scores = tuple[int, dict[str, float]]  # samples scored, metrics


class Workload(Protocol):
    def resource_refusal(self, task: RoundTask) -> str | None:
        """Why this silo declines the task over its resource budget (before anything is downloaded), or None."""
        ...

    def release(self, task: RoundTask) -> Release:
        """How a training round's update is noised, for the privacy budget."""
        ...

    def evaluate(self, task: RoundTask, checkpoint: Path, job_state: JobStateStore) -> Scores:
        """The report of an evaluation (or injection) round on the downloaded global model."""
        ...

    def train(
        self, task: RoundTask, checkpoint: Path, delta_path: Path, spare: Path, job_state: JobStateStore
    ) -> TrainingResult:
        """A training round's update, written to `delta_path` (`spare`: a finished file it may overwrite)."""
        ...


class ModelWorkload:
    """The job's model trained on this silo's data (on one device or several) and scored on its held-out split."""

    def __init__(self, training: Training, trainer: LocalTrainer, resources: ResourceBudget) -> None:
        self._training = training
        self._trainer = trainer
        self._resources = resources

    def resource_refusal(self, task: RoundTask) -> str | None:
        return self._resources.model_refusal(task)

    def release(self, task: RoundTask) -> Release:
        dp = task.spec.privacy.dp
        return Release() if dp is None or dp.noise_multiplier <= 0 else Release(dp.mode, dp.noise_multiplier)

    def evaluate(self, task: RoundTask, checkpoint: Path, job_state: JobStateStore) -> Scores:
        return self._trainer.evaluate(task, checkpoint, job_state)

    def train(
        self, task: RoundTask, checkpoint: Path, delta_path: Path, spare: Path, job_state: JobStateStore
    ) -> TrainingResult:
        return self._training.train(task, checkpoint, delta_path, reuse=spare, job_state=job_state)


class StatisticsWorkload:
    """A statistics job: each round's update is this silo's release of its figures (weight 1)."""

    def __init__(self, release: StatisticsRelease, resources: ResourceBudget, clip_to_edges: bool) -> None:
        self._release = release
        self._resources = resources
        self._clip = clip_to_edges  # summed under CKKS: values clipped to the declared edges, no min/max

    def resource_refusal(self, task: RoundTask) -> str | None:
        return self._resources.checkpoint_refusal(task)  # no model: the checkpoint holds the job's sums

    def release(self, task: RoundTask) -> Release:
        statistics = task.spec.statistics
        assert statistics is not None  # task_workload chose this workload for it
        own = statistics.dp  # its own noise: each round one release of the mechanism (statistics.py)
        if own is None:
            return Release()
        if own.mechanism == "laplace":
            return Release(unaccounted=f"statistics job {task.job_id} adds Laplace noise")
        return Release("statistics", noise_multiplier(own))

    def evaluate(self, task: RoundTask, checkpoint: Path, job_state: JobStateStore) -> Scores:
        return 1, {}  # nothing to score; a row count could undo a suppression

    def train(
        self, task: RoundTask, checkpoint: Path, delta_path: Path, spare: Path, job_state: JobStateStore
    ) -> TrainingResult:
        sha256, figures = self._release.write(task, checkpoint, delta_path, spare, self._clip)
        return TrainingResult(delta_path, sha256, 1, figures)


class InjectionWorkload:
    """The injection stage: the injection model fine-tuned and scored on checkpoint `task.round`'s encoders."""

    def __init__(self, injector: Injection) -> None:
        self._injector = injector

    def resource_refusal(self, task: RoundTask) -> str | None:
        return None  # it builds the injector's model, not the job's

    def release(self, task: RoundTask) -> Release:
        return Release()  # it trains on the injector's public split, under no silo's budget

    def evaluate(self, task: RoundTask, checkpoint: Path, job_state: JobStateStore) -> Scores:
        return self._injector.inject(task, checkpoint)

    def train(
        self, task: RoundTask, checkpoint: Path, delta_path: Path, spare: Path, job_state: JobStateStore
    ) -> TrainingResult:
        # An injection reports like an evaluation (`state.next_step`): a train step here is a broken state, declined.
        raise InvalidInputError(f"job {task.job_id} round {task.round}: an injection task uploads no update")


def task_workload(
    task: RoundTask,
    mode: SiloMode,
    training: Training,
    trainer: LocalTrainer,
    release: StatisticsRelease,
    injector: Injection,
    resources: ResourceBudget,
) -> Workload:
    """The workload of a task, from its kind and its job's spec."""
    if task.kind == RoundKind.INJECT:
        return InjectionWorkload(injector)
    if task.spec.statistics is not None:
        return StatisticsWorkload(release, resources, mode.clips_statistics_to_edges)
    return ModelWorkload(training, trainer, resources)
