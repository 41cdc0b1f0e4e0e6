"""Descriptions of the tasks a job may name: modality, input shape, classes, headline metric."""

from __future__ import annotations

from dataclasses import dataclass

from fedmeki_core.errors import NotFoundError


@dataclass(frozen=True)
class TaskInfo:
    name: str
    modality: str
    description: str
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    num_classes: int
    metric: str  # the headline metric silos report, e.g. "accuracy"


TASKS: dict[str, TaskInfo] = {
    task.name: task
    for task in (
        TaskInfo(
            name="synthetic-vitals",
            modality="ehr",
            description="Binary deterioration label from 16 hourly readings of 8 synthetic vital signs",
            input_shape=(16, 8),
            num_classes=2,
            metric="accuracy",
        ),
    )
}


def get_task(name: str) -> TaskInfo:
    try:
        return TASKS[name]
    except KeyError:
        raise NotFoundError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
